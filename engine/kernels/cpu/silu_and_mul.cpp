// The SwiGLU activation of a fused gate/up projection: for each row of [tokens, 2n],
//
//   out[t, i] = round(round(silu(x[t, i])) * x[t, n + i])
//
// as the torch path's F.silu(gate) * up computes it (round() to the model dtype; a no-op for
// fp32).  silu(g) = g / (1 + exp(-g)), through exp(-|g|) so that nothing overflows; exp differs
// from torch's in the last fp32 bits, so rare bf16 results may differ by one in the last place.
//
// Why: two ops and a temporary per layer become one pass.

#include <cstdint>

#include "simd.h"

#if defined(ENGINE_CPU_ISA)

namespace {

using namespace engine_cpu;

inline Vec silu(Vec g) {
  const Vec e = exp_nonpositive(splat(0.0f) - abs(g));  // exp(-|g|)
  // g >= 0: g / (1 + exp(-g));  g < 0: g exp(g) / (1 + exp(g)), the same value without overflow
  const Vec numerator = select_negative(g, g * e, g);
  return numerator * reciprocal_1_to_2(splat(1.0f) + e);
}

// Rows may be strided (x_stride, out_stride elements apart): an elastic level's gate/up slice is
// followed by its side path's columns, and the output row leaves room for them.
template <typename T>
void activate(const void* x, int64_t x_stride, void* out, int64_t out_stride, int64_t tokens, int64_t n, DType dtype,
              int num_threads) {
  // exp per element: worth a second thread from about 16K elements on (a 32-row decode step has 49K)
#pragma omp parallel for num_threads(num_threads) if (tokens * n >= (1 << 14))
  for (int64_t t = 0; t < tokens; t++) {
    const T* gate = static_cast<const T*>(x) + t * x_stride;
    const T* up = gate + n;
    T* row = static_cast<T*>(out) + t * out_stride;
    for (int64_t i = 0; i < n; i += kLanes) {
      const Mask live = lanes(n - i);
      const Vec activated = round_to(dtype, silu(load(gate + i, dtype, live)));
      store(row + i, activated * load(up + i, dtype, live), dtype, live);
    }
  }
}

}  // namespace

// x [tokens, 2n] and out [tokens, n], contiguous.  Returns 0, or -1 for a dtype it does not handle.
extern "C" int silu_and_mul(const void* x, int64_t x_stride, void* out, int64_t out_stride, int64_t tokens, int64_t n,
                            int dtype, int num_threads) {
  if (x_stride < 2 * n || out_stride < n) return -1;
  return with_storage_type(dtype, [&](auto element, DType type) {
    activate<decltype(element)>(x, x_stride, out, out_stride, tokens, n, type, num_threads);
  });
}

#endif
