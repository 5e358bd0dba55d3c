// What the CPU kernels share: 16-lane fp32 loads and stores of the model dtypes (fp32, bf16,
// fp16), rounding to a dtype without leaving fp32, and exp.  Included only where AVX-512 (F, BW,
// VL) is available; every kernel file keeps a stub for other CPUs.
#pragma once

#include <cstdint>
#include <immintrin.h>

namespace engine_cpu {

enum DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Calls run(element, dtype) with a value of the storage type of `dtype` (float for fp32,
// uint16_t for bf16 and fp16), so a kernel templated on it is instantiated once per storage type.
// Returns 0, or -1 for an unknown dtype code.
template <typename Run>
inline int with_storage_type(int dtype, Run&& run) {
  if (dtype == kFloat32) {
    run(float{}, kFloat32);
  } else if (dtype == kBFloat16 || dtype == kFloat16) {
    run(uint16_t{}, static_cast<DType>(dtype));
  } else {
    return -1;
  }
  return 0;
}

// Lanes [0, n) of a 16-lane vector, for row tails.
inline __mmask16 lanes(int64_t n) { return n >= 16 ? 0xffff : static_cast<__mmask16>((1u << n) - 1); }

// 16 elements -> 16 fp32 lanes.  The uint16_t overloads read bf16 (the high half of an fp32) or fp16.
inline __m512 load16(const float* p, DType) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p, DType dtype) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  if (dtype == kFloat16) return _mm512_cvtph_ps(raw);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
inline __m512 load16(const float* p, DType, __mmask16 live) { return _mm512_maskz_loadu_ps(live, p); }
inline __m512 load16(const uint16_t* p, DType dtype, __mmask16 live) {
  const __m256i raw = _mm256_maskz_loadu_epi16(live, p);
  if (dtype == kFloat16) return _mm512_cvtph_ps(raw);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// bf16 bits of fp32 lanes, rounded to nearest even; NaN stays NaN (quiet bit set).
inline __m512i bf16_bits(__m512 x) {
  const __m512i bits = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_or_si512(bits, _mm512_set1_epi32(0x400000)));
  return _mm512_srli_epi32(rounded, 16);
}

// 16 fp32 lanes -> 16 bf16 or fp16 values, rounded to nearest even.  With AVX512-BF16 one
// instruction does the bf16 rounding (NaN stays NaN) that bf16_bits spells out.
inline __m256i packed16(__m512 x, DType dtype) {
  if (dtype == kFloat16) return _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#if defined(__AVX512BF16__)
  return (__m256i)_mm512_cvtneps_pbh(x);
#else
  return _mm512_cvtepi32_epi16(bf16_bits(x));
#endif
}

// x rounded to the dtype's precision, still as fp32: what torch computes when an op's fp32
// result is stored in a bf16 or fp16 tensor and the next op reads it back.
inline __m512 round_to(DType dtype, __m512 x) {
  if (dtype == kBFloat16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(packed16(x, dtype)), 16));
  if (dtype == kFloat16) return _mm512_cvtph_ps(packed16(x, dtype));
  return x;
}
inline void store16(float* p, __m512 x, DType) { _mm512_storeu_ps(p, x); }
inline void store16(uint16_t* p, __m512 x, DType dtype) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), packed16(x, dtype));
}
inline void store16(float* p, __m512 x, DType, __mmask16 live) { _mm512_mask_storeu_ps(p, live, x); }
inline void store16(uint16_t* p, __m512 x, DType dtype, __mmask16 live) {
  _mm256_mask_storeu_epi16(p, live, packed16(x, dtype));
}

// exp(x) for x <= 0, 16 lanes: 2^n * p(r), n = round(x / ln 2), r = x - n ln 2 in [-ln2/2, ln2/2],
// p the degree-6 Taylor polynomial (relative error ~2e-7); 0 below -87, where exp leaves fp32's
// normal range.
inline __m512 exp16_nonpositive(__m512 input) {
  const __mmask16 representable = _mm512_cmp_ps_mask(input, _mm512_set1_ps(-87.0f), _CMP_GE_OQ);
  const __m512 x = _mm512_max_ps(input, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x);  // ln 2 split in two for accuracy
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_maskz_mov_ps(representable, _mm512_scalef_ps(p, n));
}

}  // namespace engine_cpu
