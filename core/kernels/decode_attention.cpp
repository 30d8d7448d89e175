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

namespace {

constexpr int64_t kMostDim = 256;

// 16 floats: one AVX-512 register, two AVX2 ones, four NEON ones (GCC's and Clang's vector extension).
typedef float Lanes __attribute__((vector_size(64)));

inline Lanes load(const float* from) {
  Lanes lanes;
  std::memcpy(&lanes, from, sizeof lanes);
  return lanes;
}

// One (row, KV head) for a head of 16 * kChunks and kGroup query heads, the queries and the
// group's outputs held in registers: each key and value is loaded once. While the scores are
// computed, the values they will weigh are fetched (measured: a fifth off the whole kernel).
template <int kChunks, int kGroup>
void attend_in_registers(const float* query, const float* key, const float* value, int64_t n,
                         int64_t slot_stride, float* scores, float* output, float* log_sum) {
  Lanes q[kGroup][kChunks], acc[kGroup][kChunks] = {};
  for (int g = 0; g < kGroup; ++g)
    for (int c = 0; c < kChunks; ++c) q[g][c] = load(query + (g * kChunks + c) * 16);
  float most[kGroup], total[kGroup];
  for (int g = 0; g < kGroup; ++g) most[g] = -std::numeric_limits<float>::infinity(), total[g] = 0.f;
  for (int64_t j = 0; j < n; ++j) {
    const float* key_j = key + j * slot_stride;
    for (int c = 0; c < kChunks; ++c) __builtin_prefetch(value + j * slot_stride + c * 16);
    Lanes k[kChunks];
    for (int c = 0; c < kChunks; ++c) k[c] = load(key_j + c * 16);
    for (int g = 0; g < kGroup; ++g) {
      Lanes products = q[g][0] * k[0];
      for (int c = 1; c < kChunks; ++c) products += q[g][c] * k[c];
      float dot = 0.f;
      for (int lane = 0; lane < 16; ++lane) dot += products[lane];
      scores[g * n + j] = dot;
      most[g] = std::max(most[g], dot);
    }
  }
  for (int g = 0; g < kGroup; ++g) {
    float* s = scores + g * n;
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < n; ++j) {
      s[j] = std::exp(s[j] - most[g]);
      sum += s[j];
    }
    total[g] = sum;
    log_sum[g] = most[g] + std::log(sum);
  }
  for (int64_t j = 0; j < n; ++j) {
    Lanes v[kChunks];
    for (int c = 0; c < kChunks; ++c) v[c] = load(value + j * slot_stride + c * 16);
    for (int g = 0; g < kGroup; ++g) {
      const float w = scores[g * n + j];
      for (int c = 0; c < kChunks; ++c) acc[g][c] += w * v[c];
    }
  }
  for (int g = 0; g < kGroup; ++g)
    for (int c = 0; c < kChunks; ++c) {
      const Lanes out = acc[g][c] / total[g];
      std::memcpy(output + (g * kChunks + c) * 16, &out, sizeof out);
    }
}

using RegisterPath = void (*)(const float*, const float*, const float*, int64_t, int64_t, float*, float*, float*);

template <int kChunks>
RegisterPath register_path_for_group(int64_t group) {
  switch (group) {
    case 1: return attend_in_registers<kChunks, 1>;
    case 2: return attend_in_registers<kChunks, 2>;
    case 4: return attend_in_registers<kChunks, 4>;
    case 8: return attend_in_registers<kChunks, 8>;
    default: return nullptr;
  }
}

// The register path for a head of ``dim`` and ``group`` query heads per KV head, or null.
RegisterPath register_path(int64_t dim, int64_t group) {
  switch (dim) {
    case 64: return register_path_for_group<4>(group);
    case 96: return register_path_for_group<6>(group);
    case 128: return register_path_for_group<8>(group);
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
    float total = 0.f;
#pragma omp simd reduction(+ : total)
    for (int64_t j = 0; j < n; ++j) {
      s[j] = std::exp(s[j] - most);
      total += s[j];
    }
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
  const RegisterPath in_registers = register_path(dim, group);

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
      if (in_registers != nullptr) {
        in_registers(q + i * group * dim, key, value, n, slot_stride, scores.data(), o + i * group * dim, l + i * group);
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
