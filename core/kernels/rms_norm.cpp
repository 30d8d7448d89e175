// Root-mean-square norm of each row (Llama, Mistral, Phi-3), in one pass over it.
//
// x [rows, dim], contiguous float32; scale [dim] -> scale * (x / sqrt(mean(x^2) + epsilon)).
//
// torch's eager form takes six passes per call (square, mean, add, reciprocal root, two
// products); a generation step norms every token twice a layer. The sum of squares is added in
// another order than torch's, so results differ from it by float rounding.
#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cmath>

namespace {

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& scale, double epsilon) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kFloat,
              "x must be a contiguous float32 [rows, dim]");
  TORCH_CHECK(scale.dim() == 1 && scale.is_contiguous() && scale.scalar_type() == at::kFloat &&
                  scale.size(0) == x.size(1),
              "scale must be a contiguous float32 [dim] of x's dim");
  const int64_t rows = x.size(0), dim = x.size(1);
  auto out = at::empty_like(x);
  const float* in = x.data_ptr<float>();
  const float* weight = scale.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const float* from = in + row * dim;
      float* to = o + row * dim;
      float squares = 0.f;
#pragma omp simd reduction(+ : squares)
      for (int64_t i = 0; i < dim; ++i) squares += from[i] * from[i];
      const float inverse = static_cast<float>(1.0 / std::sqrt(static_cast<double>(squares / dim) + epsilon));
#pragma omp simd
      for (int64_t i = 0; i < dim; ++i) to[i] = weight[i] * (from[i] * inverse);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lmq_kernels, m) {
  m.def("rms_norm(Tensor x, Tensor scale, float epsilon) -> Tensor");
  m.impl("rms_norm", c10::DispatchKey::CPU, TORCH_FN(rms_norm));
}
