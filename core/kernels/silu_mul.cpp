// A gated feed-forward's activation (Llama's, Mistral's, Phi-3's SwiGLU), in one pass.
//
// gate, up [rows, width]: float32 with unit stride in width, any row stride (the two halves of one
// GEMM's output, lmq.core.layers.projection) -> silu(gate) * up [rows, width], contiguous.
//
// torch's eager form takes two passes and a tensor between them. This one computes each value as
// torch's vectorized SiLU does on this CPU: x / (1 + exp(-x)), exp from Sleef's 1-ulp functions
// (which torch links and exports), two vectors at a time, and the values of a row past the last
// pair through expf, as torch's loop takes them; then the product. So a row gives torch's result
// to the bit, except where torch's threads split a row between them (their pairs start elsewhere,
// and a value one of them takes through expf may differ by an ulp).
#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <immintrin.h>
#include <sleef.h>
#include <torch/library.h>

#include <cmath>

#include "lanes.h"

namespace {

using lmq::kLanes, lmq::Lanes, lmq::load, lmq::store;

// Sleef's 1-ulp exp over the CPU's own vector (the one torch's SiLU calls at that width); none
// without AVX2, where every value goes through expf.
#if defined(__AVX512F__)
inline Lanes exp_of(Lanes x) { return (Lanes)Sleef_expf16_u10((__m512)x); }
#elif defined(__AVX2__)
inline Lanes exp_of(Lanes x) { return (Lanes)Sleef_expf8_u10((__m256)x); }
#endif

#pragma GCC push_options
#pragma GCC optimize("fp-contract=off", "no-fast-math")

void silu_mul_row(const float* gate, const float* up, float* out, int64_t width) {
  int64_t i = 0;
#if defined(__AVX2__)
  for (const int64_t paired = width / (2 * kLanes) * (2 * kLanes); i < paired; i += kLanes) {
    const Lanes x = load(gate + i);
    store(out + i, x / (1.f + exp_of(-x)) * load(up + i));
  }
#endif
  for (; i < width; ++i) out[i] = gate[i] / (1.f + std::exp(-gate[i])) * up[i];
}

#pragma GCC pop_options

at::Tensor silu_mul(const at::Tensor& gate, const at::Tensor& up) {
  TORCH_CHECK(gate.dim() == 2 && gate.sizes() == up.sizes() && gate.scalar_type() == at::kFloat &&
                  up.scalar_type() == at::kFloat && gate.stride(1) == 1 && up.stride(1) == 1,
              "gate and up must be float32 [rows, width] of one shape, with unit stride in width");
  const int64_t rows = gate.size(0), width = gate.size(1);
  auto out = at::empty({rows, width}, gate.options());
  const float* g = gate.data_ptr<float>();
  const float* u = up.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const int64_t gate_stride = gate.stride(0), up_stride = up.stride(0);
  at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row)
      silu_mul_row(g + row * gate_stride, u + row * up_stride, o + row * width, width);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lmq_kernels, m) {
  m.def("silu_mul(Tensor gate, Tensor up) -> Tensor");
  m.impl("silu_mul", c10::DispatchKey::CPU, TORCH_FN(silu_mul));
}
