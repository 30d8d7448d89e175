// A float32 projection, x @ kernel (+ bias), over a kernel packed once into column panels.
//
// pack_linear(kernel [in, out]) -> panels [ceil(out / kPanel), in, kPanel]: each panel holds kPanel
//   consecutive output columns, one row of them per input, zero past the last column.
// linear(x [rows, in], panels, out, bias [out] or None) -> [rows, out]: x with unit stride in ``in``,
//   any row stride (a flattened step's hidden states, an attention output).
//
// Each panel is read from memory once per call (per 96 rows of x): up to kRows rows of x at a time
// go through it, every output the sum of its products in the order of the inputs, by fused
// multiply-adds, plus the bias. That is the order oneDNN's GEMM sums in over up to 512 inputs, so
// the results are its own to the bit there. A decode step's few rows are bound by streaming the
// kernel from memory, where oneDNN's GEMM reached a third to a half of the memory's speed;
// lmq.core.kernels says what this one measured.
#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>

#include "lanes.h"

namespace {

using lmq::kLanes, lmq::Lanes, lmq::load, lmq::store;

// A panel is two of the CPU's own vectors wide, and a tile of kRows rows keeps 2 * kRows sums in
// registers beside the panel's two vectors and x's value: 15 of AVX2's 16.
constexpr int kRows = 6;
constexpr int64_t kPanel = 2 * kLanes;
constexpr int64_t kRowBlock = 96;  // rows of x per pass over the panels: 192 KiB at 512 inputs

at::Tensor pack_linear(const at::Tensor& kernel) {
  TORCH_CHECK(kernel.dim() == 2 && kernel.scalar_type() == at::kFloat, "kernel must be float32 [in, out]");
  const auto rows = kernel.contiguous();
  const int64_t inputs = rows.size(0), outputs = rows.size(1), panels = (outputs + kPanel - 1) / kPanel;
  auto packed = at::zeros({panels, inputs, kPanel}, kernel.options());
  const float* from = rows.data_ptr<float>();
  float* to = packed.data_ptr<float>();
  at::parallel_for(0, panels, 16, [&](int64_t begin, int64_t end) {
    for (int64_t panel = begin; panel < end; ++panel) {
      const int64_t first = panel * kPanel, width = std::min(kPanel, outputs - first);
      for (int64_t k = 0; k < inputs; ++k)
        std::memcpy(to + (panel * inputs + k) * kPanel, from + k * outputs + first, width * sizeof(float));
    }
  });
  return packed;
}

// R rows of x [R, inputs] (row stride x_stride) through one panel [inputs, kPanel] -> the first
// ``width`` columns of out [R, width] (row stride out_stride), plus bias [width] (or none).
// Meanwhile, the next panel's rows ``fetch``, ``fetch + fetch_step``, ... are fetched into the
// core's cache (none where ``next`` is null).
template <int R>
void tile(const float* x, int64_t x_stride, const float* panel, int64_t inputs, float* out, int64_t out_stride,
          int64_t width, const float* bias, const float* next, int64_t fetch, int64_t fetch_step) {
  Lanes low[R], high[R];
  for (int r = 0; r < R; ++r) low[r] = high[r] = Lanes{};
  if (next == nullptr) fetch = inputs;
  for (int64_t k = 0; k < inputs; ++k) {
    const Lanes panel_low = load(panel + k * kPanel), panel_high = load(panel + k * kPanel + kLanes);
    if (k == fetch) {
      for (int64_t line = 0; line < kPanel; line += 16) __builtin_prefetch(next + k * kPanel + line, 0, 1);
      fetch += fetch_step;
    }
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const float value = x[r * x_stride + k];
      low[r] += value * panel_low;
      high[r] += value * panel_high;
    }
  }
  float sums[kPanel];
  for (int r = 0; r < R; ++r) {
    store(sums, low[r]);
    store(sums + kLanes, high[r]);
    if (bias != nullptr)
      for (int64_t j = 0; j < width; ++j) sums[j] += bias[j];
    std::memcpy(out + r * out_stride, sums, width * sizeof(float));
  }
}

typedef void (*Tile)(const float*, int64_t, const float*, int64_t, float*, int64_t, int64_t, const float*, const float*,
                     int64_t, int64_t);
constexpr Tile kTiles[kRows + 1] = {nullptr, tile<1>, tile<2>, tile<3>, tile<4>, tile<5>, tile<6>};
static_assert(kRows == 6, "kTiles holds a tile of each size up to kRows");

// Any number of rows through one panel, in tiles of as even a size as kRows allows (8 rows as 4 and
// 4, whose 8 sums each keep the CPU's two multiply-add units busy, where a tile of 2 waits on each
// sum's last add). Meanwhile the tiles fetch the next panel from memory, each a share of its rows
// spread over its own time, so the memory streams while the core computes on this panel's cached
// copy: 1.1x-1.3x as fast at 4..64 rows of kernels read cold from memory (AVX2, Zen 3).
void panel_rows(const float* x, int64_t x_stride, int64_t rows, const float* panel, int64_t inputs, float* out,
                int64_t out_stride, int64_t width, const float* bias, const float* next) {
  const int64_t tiles = (rows + kRows - 1) / kRows;
  for (int64_t tile = 0; tile < tiles; ++tile) {
    const int64_t size = rows / (tiles - tile);  // the rest split evenly; the last tile takes the remainder
    kTiles[size](x, x_stride, panel, inputs, out, out_stride, width, bias, next, tile, tiles);
    rows -= size, x += size * x_stride, out += size * out_stride;
  }
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& packed, int64_t outputs,
                  const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.stride(1) == 1,
              "x must be float32 [rows, in] with unit stride in in");
  const int64_t rows = x.size(0), inputs = x.size(1), panels = (outputs + kPanel - 1) / kPanel;
  TORCH_CHECK(packed.dim() == 3 && packed.is_contiguous() && packed.scalar_type() == at::kFloat &&
                  packed.size(0) == panels && packed.size(1) == inputs && packed.size(2) == kPanel,
              "packed must be pack_linear's panels of a kernel [", inputs, ", ", outputs, "]");
  TORCH_CHECK(!bias || (bias->is_contiguous() && bias->scalar_type() == at::kFloat && bias->numel() == outputs),
              "bias must be a contiguous float32 [", outputs, "]");
  auto out = at::empty({rows, outputs}, x.options());
  const float* x_data = x.data_ptr<float>();
  const float* panel_data = packed.data_ptr<float>();
  const float* bias_data = bias ? bias->data_ptr<float>() : nullptr;
  float* out_data = out.data_ptr<float>();
  for (int64_t first_row = 0; first_row < rows; first_row += kRowBlock) {
    const int64_t block = std::min(kRowBlock, rows - first_row);
    at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
      for (int64_t panel = begin; panel < end; ++panel) {
        const int64_t first = panel * kPanel;
        const float* next = panel + 1 < end ? panel_data + (panel + 1) * inputs * kPanel : nullptr;
        panel_rows(x_data + first_row * x.stride(0), x.stride(0), block, panel_data + panel * inputs * kPanel, inputs,
                   out_data + first_row * outputs + first, outputs, std::min(kPanel, outputs - first),
                   bias_data ? bias_data + first : nullptr, next);
      }
    });
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lmq_kernels, m) {
  m.def("pack_linear(Tensor kernel) -> Tensor");
  m.impl("pack_linear", c10::DispatchKey::CPU, TORCH_FN(pack_linear));
  m.def("linear(Tensor x, Tensor packed, int outputs, Tensor? bias) -> Tensor");
  m.impl("linear", c10::DispatchKey::CPU, TORCH_FN(linear));
}
