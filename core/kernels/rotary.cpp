// Rotary position embedding of one flattened step's queries and keys, in one pass and one call.
//
// query [query heads, tokens, dim], key [key heads, tokens, dim]: any strides but the last (a
//   projection's output seen per head);
// cos, sin [tokens, dim]: each token's angles, both halves alike (lmq.core.layers.rotary).
// -> both rotated, [heads, tokens, dim] each, contiguous: x * cos + rotate_half(x) * sin, where
//    rotate_half(x) is (-x[half:], x[:half]).
//
// torch's eager form takes five passes and a concatenation per tensor (two negated and copied
// halves, two products, a sum); this reads each once, and a layer's queries and keys go in one
// call (a call costs about 7 us, more than rotating a decode step's). Products and sums are
// rounded as there (compiled without contraction into fused multiply-adds), so the result is the same.
#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <tuple>

namespace {

#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")

// One token of one head: ``from`` [dim] rotated into ``to``.
inline void rotate(const float* from, const float* cos_t, const float* sin_t, float* to, int64_t dim) {
  const int64_t half = dim / 2;
#pragma omp simd
  for (int64_t i = 0; i < half; ++i) {
    const float first = from[i] * cos_t[i], rotated = -from[i + half] * sin_t[i];
    to[i] = first + rotated;
  }
#pragma omp simd
  for (int64_t i = half; i < dim; ++i) {
    const float first = from[i] * cos_t[i], rotated = from[i - half] * sin_t[i];
    to[i] = first + rotated;
  }
}

std::tuple<at::Tensor, at::Tensor> rotary(const at::Tensor& query, const at::Tensor& key, const at::Tensor& cos,
                                          const at::Tensor& sin) {
  for (const at::Tensor* x : {&query, &key}) {
    TORCH_CHECK(x->dim() == 3 && x->scalar_type() == at::kFloat && x->stride(2) == 1,
                "query and key must be float32 [heads, tokens, dim] with unit stride in dim");
  }
  TORCH_CHECK(query.size(1) == key.size(1) && query.size(2) == key.size(2),
              "query and key must have the same tokens and dim");
  TORCH_CHECK(cos.dim() == 2 && cos.is_contiguous() && sin.is_contiguous() && cos.sizes() == sin.sizes() &&
                  cos.size(0) == query.size(1) && cos.size(1) == query.size(2) && cos.scalar_type() == at::kFloat &&
                  sin.scalar_type() == at::kFloat,
              "cos and sin must be contiguous float32 [tokens, dim] of the query's tokens and dim");
  TORCH_CHECK(query.size(2) % 2 == 0, "dim must be even, got ", query.size(2));
  const int64_t query_heads = query.size(0), tokens = query.size(1), dim = query.size(2);
  auto query_out = at::empty({query_heads, tokens, dim}, query.options());
  auto key_out = at::empty({key.size(0), tokens, dim}, key.options());
  const float* c = cos.data_ptr<float>();
  const float* s = sin.data_ptr<float>();
  const float* in[] = {query.data_ptr<float>(), key.data_ptr<float>()};
  float* out[] = {query_out.data_ptr<float>(), key_out.data_ptr<float>()};
  const int64_t head_stride[] = {query.stride(0), key.stride(0)}, token_stride[] = {query.stride(1), key.stride(1)};
  at::parallel_for(0, (query_heads + key.size(0)) * tokens, 64, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {  // the query's heads, then the key's
      const int x = item < query_heads * tokens ? 0 : 1;
      const int64_t within = x == 0 ? item : item - query_heads * tokens;
      const int64_t head = within / tokens, token = within % tokens;
      rotate(in[x] + head * head_stride[x] + token * token_stride[x], c + token * dim, s + token * dim,
             out[x] + within * dim, dim);
    }
  });
  return {query_out, key_out};
}

#pragma GCC pop_options

}  // namespace

TORCH_LIBRARY_FRAGMENT(lmq_kernels, m) {
  m.def("rotary(Tensor query, Tensor key, Tensor cos, Tensor sin) -> (Tensor, Tensor)");
  m.impl("rotary", c10::DispatchKey::CPU, TORCH_FN(rotary));
}
