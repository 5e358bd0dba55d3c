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

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include "simd.h"

namespace {

using namespace engine_cpu;

inline __m512 silu16(__m512 g) {
  const __m512 e = exp16_nonpositive(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(g)));  // exp(-|g|)
  const __m512 one = _mm512_set1_ps(1.0f);
  // g >= 0: g / (1 + exp(-g));  g < 0: g exp(g) / (1 + exp(g)), the same value without overflow
  const __mmask16 negative = _mm512_cmp_ps_mask(g, _mm512_setzero_ps(), _CMP_LT_OQ);
  const __m512 numerator = _mm512_mask_mul_ps(g, negative, g, e);
  // 1 / (1 + e) for 1 + e in [1, 2]: the 14-bit reciprocal estimate and one Newton step (~1e-8
  // relative), a third of a division's cost.
  const __m512 denominator = _mm512_add_ps(one, e);
  __m512 reciprocal = _mm512_rcp14_ps(denominator);
  reciprocal = _mm512_mul_ps(reciprocal, _mm512_fnmadd_ps(denominator, reciprocal, _mm512_set1_ps(2.0f)));
  return _mm512_mul_ps(numerator, reciprocal);
}

template <typename T>
void activate(const void* x, void* out, int64_t tokens, int64_t n, DType dtype, int num_threads) {
  // exp per element: worth a second thread from about 16K elements on (a 32-row decode step has 49K)
#pragma omp parallel for num_threads(num_threads) if (tokens * n >= (1 << 14))
  for (int64_t t = 0; t < tokens; t++) {
    const T* gate = static_cast<const T*>(x) + t * 2 * n;
    const T* up = gate + n;
    T* row = static_cast<T*>(out) + t * n;
    for (int64_t i = 0; i < n; i += 16) {
      const __mmask16 live = lanes(n - i);
      const __m512 activated = round_to(dtype, silu16(load16(gate + i, dtype, live)));
      store16(row + i, _mm512_mul_ps(activated, load16(up + i, dtype, live)), dtype, live);
    }
  }
}

}  // namespace

// x [tokens, 2n] and out [tokens, n], contiguous.  Returns 0, or -1 for a dtype it does not handle.
extern "C" int silu_and_mul(const void* x, void* out, int64_t tokens, int64_t n, int dtype, int num_threads) {
  return with_storage_type(dtype, [&](auto element, DType type) {
    activate<decltype(element)>(x, out, tokens, n, type, num_threads);
  });
}

#endif
