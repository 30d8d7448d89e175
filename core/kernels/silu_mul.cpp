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

namespace {

#pragma GCC push_options
#pragma GCC optimize("fp-contract=off", "no-fast-math")

void silu_mul_row(const float* gate, const float* up, float* out, int64_t width) {
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 one = _mm512_set1_ps(1.f);
  for (const int64_t paired = width / 32 * 32; i < paired; i += 16) {
    const __m512 x = _mm512_loadu_ps(gate + i);
    const __m512 e = Sleef_expf16_u10(_mm512_sub_ps(_mm512_setzero_ps(), x));
    const __m512 silu = _mm512_div_ps(x, _mm512_add_ps(one, e));
    _mm512_storeu_ps(out + i, _mm512_mul_ps(silu, _mm512_loadu_ps(up + i)));
  }
#elif defined(__AVX2__)
  const __m256 one = _mm256_set1_ps(1.f);
  for (const int64_t paired = width / 16 * 16; i < paired; i += 8) {
    const __m256 x = _mm256_loadu_ps(gate + i);
    const __m256 e = Sleef_expf8_u10(_mm256_sub_ps(_mm256_setzero_ps(), x));
    const __m256 silu = _mm256_div_ps(x, _mm256_add_ps(one, e));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(silu, _mm256_loadu_ps(up + i)));
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
