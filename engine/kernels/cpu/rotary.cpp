// Rotate-half RoPE (Hugging Face layout), in place, on the query and key heads of each token:
// for d < half, with c = cos[t, d] and s = sin[t, d] in the model dtype,
//
//   x[d]        <- round(round(x[d] c) - round(x[d + half] s))
//   x[d + half] <- round(round(x[d + half] c) + round(x[d] s))
//
// round() is rounding to the model dtype (a no-op for fp32), so the result is the torch path's
// x * cat(c, c) + cat(x2, x1) * cat(-s, s), element for element, bit for bit.
//
// Why: the torch version is four ops per tensor (and a cat), for Q and K, every layer.  Here Q
// and K heads are adjacent in the fused QKV projection's output, so one call rotates both.

#include <cstdint>

#include "simd.h"

#if defined(ENGINE_CPU_ISA)

namespace {

using namespace engine_cpu;

template <typename T>
void rotate_token(T* x, int64_t heads, int64_t head_dim, const T* cos, const T* sin, DType dtype) {
  const int64_t half = head_dim / 2;
  for (int64_t h = 0; h < heads; h++) {
    T* first = x + h * head_dim;
    T* second = first + half;
    for (int64_t d = 0; d < half; d += kLanes) {
      const Mask live = lanes(half - d);
      const Vec c = load(cos + d, dtype, live), s = load(sin + d, dtype, live);
      const Vec x1 = load(first + d, dtype, live), x2 = load(second + d, dtype, live);
      const Vec x1c = round_to(dtype, x1 * c), x2s = round_to(dtype, x2 * s);
      const Vec x2c = round_to(dtype, x2 * c), x1s = round_to(dtype, x1 * s);
      store(first + d, x1c - x2s, dtype, live);
      store(second + d, x2c + x1s, dtype, live);
    }
  }
}

template <typename T>
void rotate(void* x, int64_t tokens, int64_t heads, int64_t head_dim, int64_t token_stride, const void* cos,
            const void* sin, DType dtype, int num_threads) {
  const int64_t half = head_dim / 2;
#pragma omp parallel for num_threads(num_threads) if (tokens * heads * head_dim >= (1 << 16))
  for (int64_t t = 0; t < tokens; t++)
    rotate_token(static_cast<T*>(x) + t * token_stride, heads, head_dim, static_cast<const T*>(cos) + t * half,
                 static_cast<const T*>(sin) + t * half, dtype);
}

}  // namespace

// x: tokens rows token_stride apart, each `heads` contiguous heads of head_dim (even); cos and
// sin: [tokens, head_dim / 2] contiguous, in x's dtype.  Returns 0, or -1 for what it does not handle.
extern "C" int rotary_embedding(void* x, int64_t tokens, int64_t heads, int64_t head_dim, int64_t token_stride,
                                const void* cos, const void* sin, int dtype, int num_threads) {
  if (head_dim % 2 != 0) return -1;
  return with_storage_type(dtype, [&](auto element, DType type) {
    rotate<decltype(element)>(x, tokens, heads, head_dim, token_stride, cos, sin, type, num_threads);
  });
}

#endif
