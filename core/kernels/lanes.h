// The CPU's own vector of floats, shared by lmq's kernels that compute in it.
#pragma once

#include <cstring>

namespace lmq {

// In GCC's and Clang's vector extension: 16 floats with AVX-512, 8 with AVX, else 4 (SSE, NEON).
// A vector type wider than the CPU's is split, and its pieces go through the stack: with 16 floats
// on an AVX2 CPU, the decode attention kernel took nine times as long as reading its keys.
#if defined(__AVX512F__)
constexpr int kLanes = 16;
#elif defined(__AVX__)
constexpr int kLanes = 8;
#else
constexpr int kLanes = 4;
#endif
typedef float Lanes __attribute__((vector_size(kLanes * sizeof(float))));

inline Lanes load(const float* from) {
  Lanes lanes;
  std::memcpy(&lanes, from, sizeof lanes);
  return lanes;
}

inline void store(float* to, Lanes lanes) { std::memcpy(to, &lanes, sizeof lanes); }

}  // namespace lmq
