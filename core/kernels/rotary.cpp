// Rotary position embedding of one flattened step's queries or keys, in one pass.
//
// x [heads, tokens, dim]: any strides but the last (a projection's output seen per head);
// cos, sin [tokens, dim]: each token's angles, both halves alike (lmq.core.layers.rotary).
// -> [heads, tokens, dim], contiguous: x * cos + rotate_half(x) * sin, where rotate_half(x) is
//    (-x[half:], x[:half]).
//
// torch's eager form takes five passes and a concatenation per tensor (two negated and copied
// halves, two products, a sum); this reads x once. Products and sums are rounded as there
// (compiled without contraction into fused multiply-adds), so the result is the same.
#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

namespace {

#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")

at::Tensor rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.dim() == 3 && x.scalar_type() == at::kFloat && x.stride(2) == 1,
              "x must be float32 [heads, tokens, dim] with unit stride in dim");
  TORCH_CHECK(cos.dim() == 2 && cos.is_contiguous() && sin.is_contiguous() && cos.sizes() == sin.sizes() &&
                  cos.size(0) == x.size(1) && cos.size(1) == x.size(2) && cos.scalar_type() == at::kFloat &&
                  sin.scalar_type() == at::kFloat,
              "cos and sin must be contiguous float32 [tokens, dim] of x's tokens and dim");
  TORCH_CHECK(x.size(2) % 2 == 0, "dim must be even, got ", x.size(2));
  const int64_t heads = x.size(0), tokens = x.size(1), dim = x.size(2), half = dim / 2;
  const int64_t head_stride = x.stride(0), token_stride = x.stride(1);
  auto out = at::empty({heads, tokens, dim}, x.options());
  const float* in = x.data_ptr<float>();
  const float* c = cos.data_ptr<float>();
  const float* s = sin.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, heads * tokens, 64, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t head = item / tokens, token = item % tokens;
      const float* from = in + head * head_stride + token * token_stride;
      const float* cos_t = c + token * dim;
      const float* sin_t = s + token * dim;
      float* to = o + item * dim;
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
  });
  return out;
}

#pragma GCC pop_options

}  // namespace

TORCH_LIBRARY_FRAGMENT(lmq_kernels, m) {
  m.def("rotary(Tensor x, Tensor cos, Tensor sin) -> Tensor");
  m.impl("rotary", c10::DispatchKey::CPU, TORCH_FN(rotary));
}
