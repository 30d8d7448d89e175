// A flattened step's keys and values into their cache rows, in one call for both.
//
// cache_keys, cache_values [slots, heads, length, dim]: one layer of the cache (unit stride in dim);
// keys, values [heads, tokens, dim]: the step's, any strides but the last (a projection's output
//   seen per head, or the rotary kernel's);
// rows, positions [tokens], int64: each token's cache slot and its position there.
//
// torch's indexed assignment (cache[rows, :, positions] = keys) costs about 30 us a call at a
// decode step's 64 tokens, mostly in building its index iterator; the copies themselves are a
// few hundred rows of dim floats.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cstring>

namespace {

void write_one(at::Tensor& cache, const at::Tensor& x, const int64_t* rows, const int64_t* positions) {
  const int64_t heads = x.size(0), tokens = x.size(1), dim = x.size(2);
  const float* from = x.data_ptr<float>();
  float* to = cache.data_ptr<float>();
  for (int64_t token = 0; token < tokens; ++token) {
    float* slot = to + rows[token] * cache.stride(0) + positions[token] * cache.stride(2);
    for (int64_t head = 0; head < heads; ++head) {
      std::memcpy(slot + head * cache.stride(1), from + head * x.stride(0) + token * x.stride(1), dim * sizeof(float));
    }
  }
}

void write_kv(at::Tensor cache_keys, at::Tensor cache_values, const at::Tensor& keys, const at::Tensor& values,
              const at::Tensor& rows, const at::Tensor& positions) {
  for (const at::Tensor* cache : {&cache_keys, &cache_values}) {
    TORCH_CHECK(cache->dim() == 4 && cache->scalar_type() == at::kFloat && cache->stride(3) == 1,
                "the cache must be float32 [slots, heads, length, dim] with unit stride in dim");
  }
  TORCH_CHECK(cache_keys.sizes() == cache_values.sizes(), "keys and values caches differ in shape");
  for (const at::Tensor* x : {&keys, &values}) {
    TORCH_CHECK(x->dim() == 3 && x->scalar_type() == at::kFloat && x->stride(2) == 1 &&
                    x->size(0) == cache_keys.size(1) && x->size(2) == cache_keys.size(3),
                "keys and values must be float32 [heads, tokens, dim] of the cache's heads and dim");
  }
  TORCH_CHECK(keys.sizes() == values.sizes(), "keys and values differ in shape");
  const int64_t tokens = keys.size(1);
  TORCH_CHECK(rows.scalar_type() == at::kLong && positions.scalar_type() == at::kLong && rows.is_contiguous() &&
                  positions.is_contiguous() && rows.numel() == tokens && positions.numel() == tokens,
              "rows and positions must be contiguous int64 [tokens]");
  const int64_t* row = rows.data_ptr<int64_t>();
  const int64_t* position = positions.data_ptr<int64_t>();
  for (int64_t token = 0; token < tokens; ++token) {
    TORCH_CHECK(0 <= row[token] && row[token] < cache_keys.size(0), "row ", row[token], " is outside the cache's ",
                cache_keys.size(0), " slots");
    TORCH_CHECK(0 <= position[token] && position[token] < cache_keys.size(2), "position ", position[token],
                " is outside the cache's ", cache_keys.size(2), " positions");
  }
  write_one(cache_keys, keys, row, position);
  write_one(cache_values, values, row, position);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lmq_kernels, m) {
  m.def("write_kv(Tensor(a!) cache_keys, Tensor(b!) cache_values, Tensor keys, Tensor values, Tensor rows, "
        "Tensor positions) -> ()");
  m.impl("write_kv", c10::DispatchKey::CPU, TORCH_FN(write_kv));
}
