// Attention of decoding rows, one query each, over each row's own keys in the KV cache.
//
// queries [rows, kv heads, group, dim]: the query heads that share a KV head, scaled by 1/sqrt(dim);
// keys, values [rows, kv heads, slots, dim]: a view of the cache (any strides but the last);
// lengths [rows]: row r attends to its first lengths[r] slots (a causal mask, no window or bias).
// -> [rows, kv heads, group, dim]
//
// Each (row, KV head) reads its keys and values once, for all the query heads of its group, and
// no further than its own length: torch's CPU kernels work in blocks of queries and read every
// row to the longest (lmq.core.kernels says what it measured).
#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kMostDim = 256;

// kDim: the head size, known at compile time for the common ones (0: any, read from dim).
template <int64_t kDim>
void attend(const at::Tensor& queries, const at::Tensor& keys, const at::Tensor& values,
            const at::Tensor& lengths, at::Tensor& out) {
  const int64_t heads = queries.size(1), group = queries.size(2), dim = kDim ? kDim : queries.size(3);
  const float* q = queries.data_ptr<float>();
  const float* k = keys.data_ptr<float>();
  const float* v = values.data_ptr<float>();
  const int64_t* length = lengths.data_ptr<int64_t>();
  float* o = out.data_ptr<float>();
  const int64_t row_stride = keys.stride(0), head_stride = keys.stride(1), slot_stride = keys.stride(2);

  const int64_t rows = queries.size(0);
  at::parallel_for(0, rows * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;  // [group, n]
    for (int64_t item = begin; item < end; ++item) {
      // Items alternate between the first rows and the last, so that each thread's share of a
      // batch ordered by length (as the scheduler admits it, shortest first) holds as many keys.
      const int64_t turn = item / heads, head = item % heads;
      const int64_t row = turn % 2 ? rows - 1 - turn / 2 : turn / 2, i = row * heads + head, n = length[row];
      const float* key = k + row * row_stride + head * head_stride;
      const float* value = v + row * row_stride + head * head_stride;
      const float* query = q + i * group * dim;
      float* output = o + i * group * dim;
      scores.resize(group * n);
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
        float* s = scores.data() + g * n;
        float most = -std::numeric_limits<float>::infinity();
        for (int64_t j = 0; j < n; ++j) most = std::max(most, s[j]);
        float total = 0.f;
#pragma omp simd reduction(+ : total)
        for (int64_t j = 0; j < n; ++j) {
          s[j] = std::exp(s[j] - most);
          total += s[j];
        }
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
  });
}

at::Tensor decode_attention(const at::Tensor& queries, const at::Tensor& keys, const at::Tensor& values,
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
  switch (queries.size(3)) {
    case 64: attend<64>(queries, keys, values, lengths, out); break;
    case 128: attend<128>(queries, keys, values, lengths, out); break;
    default: attend<0>(queries, keys, values, lengths, out);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(lmq_kernels, m) {
  m.def("decode_attention(Tensor queries, Tensor keys, Tensor values, Tensor lengths) -> Tensor");
  m.impl("decode_attention", c10::DispatchKey::CPU, TORCH_FN(decode_attention));
}
