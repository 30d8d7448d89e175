// Attention of decoding rows, one query each, over each row's own keys in the KV cache.
//
// queries [rows, kv heads, group, dim]: the query heads that share a KV head, scaled by 1/sqrt(dim);
// keys, values [rows, kv heads, slots, dim]: a view of the cache (any strides but the last);
// lengths [rows]: row r attends to its first lengths[r] slots (a causal mask, no window or bias).
// -> the outputs [rows, kv heads, group, dim] and the log of each query's softmax denominator
//    [rows, kv heads, group], by which attention over more keys (a shared prefix) merges with this.
//
// Each (row, KV head) reads its keys and values once, for all the query heads of its group, and
// no further than its own length: torch's CPU kernels work in blocks of queries and read every
// row to the longest (lmq.core.kernels says what it measured).
#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#include "lanes.h"

namespace {

using lmq::kLanes, lmq::Lanes, lmq::load;

constexpr int64_t kMostDim = 256;

// Scores ``s`` [n] of largest ``most`` -> their softmax's numerators exp(s - most), in place; returns
// their sum, the softmax's denominator.
inline float exponentiate(float* s, int64_t n, float most) {
  float total = 0.f;
#pragma omp simd reduction(+ : total)
  for (int64_t j = 0; j < n; ++j) {
    s[j] = std::exp(s[j] - most);
    total += s[j];
  }
  return total;
}

// The most vectors of a head's values summed at once: a divisor of ``chunks`` up to 8, so that
// the sums stay in registers (16 of them with AVX2).
constexpr int block_of(int chunks) {
  for (int block = 8; block > 1; --block)
    if (chunks % block == 0) return block;
  return 1;
}

// The weighted sum of a head's values, vectors [first, first + kBlock) of each: output = sum over
// the keys j of weights[j] * value_j / total.
template <int kBlock>
void weigh_values(const float* weights, const float* value, int64_t n, int64_t slot_stride, int first,
                  float total, float* output) {
  Lanes sum[kBlock] = {};
  for (int64_t j = 0; j < n; ++j) {
    const float* value_j = value + j * slot_stride + first * kLanes;
    const float w = weights[j];
    for (int c = 0; c < kBlock; ++c) sum[c] += w * load(value_j + c * kLanes);
  }
  for (int c = 0; c < kBlock; ++c) {
    const Lanes out = sum[c] / total;
    std::memcpy(output + (first + c) * kLanes, &out, sizeof out);
  }
}

// One (row, KV head) for a head of kChunks vectors, query head by query head: its query stays in
// registers while the keys stream past, and the keys and values, read from memory by the first
// query head, are in the core's cache for the others. The values are fetched while the first
// query head's scores are computed (measured on b's shape: 284-337 us against 353-395 without).
template <int kChunks>
void attend_vectorized(const float* query, const float* key, const float* value, int64_t n, int64_t slot_stride,
                       int64_t group, float* scores, float* output, float* log_sum) {
  constexpr int kDim = kChunks * kLanes, kBlock = block_of(kChunks);
  for (int64_t g = 0; g < group; ++g) {
    Lanes q[kChunks];
    for (int c = 0; c < kChunks; ++c) q[c] = load(query + g * kDim + c * kLanes);
    float* s = scores + g * n;
    float most = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < n; ++j) {
      const float* key_j = key + j * slot_stride;
      if (g == 0)
        for (int d = 0; d < kDim; d += 16) __builtin_prefetch(value + j * slot_stride + d);
      Lanes products = q[0] * load(key_j);
      for (int c = 1; c < kChunks; ++c) products += q[c] * load(key_j + c * kLanes);
      float dot = 0.f;
      for (int lane = 0; lane < kLanes; ++lane) dot += products[lane];
      s[j] = dot;
      most = std::max(most, dot);
    }
    const float total = exponentiate(s, n, most);
    log_sum[g] = most + std::log(total);
    for (int first = 0; first < kChunks; first += kBlock)
      weigh_values<kBlock>(s, value, n, slot_stride, first, total, output + g * kDim);
  }
}

using VectorPath = void (*)(const float*, const float*, const float*, int64_t, int64_t, int64_t, float*, float*,
                            float*);

// The vectorized path for a head of ``dim`` (64, 96 or 128), or null.
VectorPath vector_path(int64_t dim) {
  switch (dim) {
    case 64: return attend_vectorized<64 / kLanes>;
    case 96: return attend_vectorized<96 / kLanes>;
    case 128: return attend_vectorized<128 / kLanes>;
    default: return nullptr;
  }
}

// One (row, KV head) of any head size and group: the same steps, through memory.
void attend_any(const float* query, const float* key, const float* value, int64_t n, int64_t slot_stride,
                int64_t group, int64_t dim, float* scores, float* output, float* log_sum) {
  for (int64_t j = 0; j < n; ++j) {  // each key once, against every query of the group
    const float* key_j = key + j * slot_stride;
    for (int64_t g = 0; g < group; ++g) {
      const float* query_g = query + g * dim;
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < dim; ++d) dot += query_g[d] * key_j[d];
      scores[g * n + j] = dot;
    }
  }
  for (int64_t g = 0; g < group; ++g) {  // softmax, then the weighted sum of the values
    float* s = scores + g * n;
    float most = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < n; ++j) most = std::max(most, s[j]);
    const float total = exponentiate(s, n, most);
    log_sum[g] = most + std::log(total);
    float sum[kMostDim] = {};
    for (int64_t j = 0; j < n; ++j) {
      const float* value_j = value + j * slot_stride;
      const float w = s[j];
#pragma omp simd
      for (int64_t d = 0; d < dim; ++d) sum[d] += w * value_j[d];
    }
    for (int64_t d = 0; d < dim; ++d) output[g * dim + d] = sum[d] / total;
  }
}

void attend(const at::Tensor& queries, const at::Tensor& keys, const at::Tensor& values,
            const at::Tensor& lengths, at::Tensor& out, at::Tensor& log_sums) {
  const int64_t rows = queries.size(0), heads = queries.size(1), group = queries.size(2), dim = queries.size(3);
  const float* q = queries.data_ptr<float>();
  const float* k = keys.data_ptr<float>();
  const float* v = values.data_ptr<float>();
  const int64_t* length = lengths.data_ptr<int64_t>();
  float* o = out.data_ptr<float>();
  float* l = log_sums.data_ptr<float>();
  const int64_t row_stride = keys.stride(0), head_stride = keys.stride(1), slot_stride = keys.stride(2);
  const VectorPath vectorized = vector_path(dim);

  at::parallel_for(0, rows * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;  // [group, n]
    for (int64_t item = begin; item < end; ++item) {
      // Items alternate between the first rows and the last, so that each thread's share of a
      // batch ordered by length (as the scheduler admits it, shortest first) holds as many keys.
      const int64_t turn = item / heads, head = item % heads;
      const int64_t row = turn % 2 ? rows - 1 - turn / 2 : turn / 2, i = row * heads + head, n = length[row];
      const float* key = k + row * row_stride + head * head_stride;
      const float* value = v + row * row_stride + head * head_stride;
      scores.resize(group * n);
      if (vectorized != nullptr) {
        vectorized(q + i * group * dim, key, value, n, slot_stride, group, scores.data(), o + i * group * dim,
                   l + i * group);
      } else {
        attend_any(q + i * group * dim, key, value, n, slot_stride, group, dim, scores.data(), o + i * group * dim,
                   l + i * group);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> decode_attention(const at::Tensor& queries, const at::Tensor& keys, const at::Tensor& values,
                            const at::Tensor& lengths) {
  TORCH_CHECK(queries.dim() == 4 && queries.is_contiguous() && queries.scalar_type() == at::kFloat,
              "queries must be a contiguous float32 [rows, kv heads, group, dim]");
  TORCH_CHECK(keys.scalar_type() == at::kFloat && values.scalar_type() == at::kFloat && keys.dim() == 4 &&
                  keys.sizes() == values.sizes() && keys.strides() == values.strides() && keys.stride(3) == 1,
              "keys and values must be float32 [rows, kv heads, slots, dim] views of one layout");
  TORCH_CHECK(keys.size(0) == queries.size(0) && keys.size(1) == queries.size(1) && keys.size(3) == queries.size(3),
              "keys and values must have the queries' rows, kv heads and dim");
  TORCH_CHECK(queries.size(3) <= kMostDim, "head dim above ", kMostDim);
  TORCH_CHECK(lengths.scalar_type() == at::kLong && lengths.is_contiguous() && lengths.numel() == queries.size(0),
              "lengths must be int64 [rows]");
  const int64_t* length = lengths.data_ptr<int64_t>();
  for (int64_t row = 0; row < lengths.numel(); ++row) {
    TORCH_CHECK(length[row] >= 1 && length[row] <= keys.size(2), "row ", row, "'s length ", length[row],
                " is not within 1..", keys.size(2));
  }
  auto out = at::empty_like(queries);
  auto log_sums = at::empty({queries.size(0), queries.size(1), queries.size(2)}, queries.options());
  attend(queries, keys, values, lengths, out, log_sums);
  return {out, log_sums};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lmq_kernels, m) {
  m.def("decode_attention(Tensor queries, Tensor keys, Tensor values, Tensor lengths) -> (Tensor, Tensor)");
  m.impl("decode_attention", c10::DispatchKey::CPU, TORCH_FN(decode_attention));
}
