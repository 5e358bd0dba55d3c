// What the CPU kernels share: a vector of fp32 lanes, its loads and stores of the model dtypes
// (fp32, bf16, fp16) with row tails, rounding to a dtype without leaving fp32, exp, and sums
// across lanes.  Each kernel is written once against these and compiled once per ISA build, with
// that build's flags (native_library.py):
//
//   build        flags                                  Vec     kLanes  row tails (Mask)
//   avx512_bf16  avx512's and -mavx512bf16              __m512  16      mask registers
//   avx512       avx2's and -mavx512f/bw/vl/dq          __m512  16      mask registers
//   avx2         -mavx2 -mfma -mf16c                    __m256  8       through a stack buffer
//
// The builds compute the same numbers: the same operations, rounded at the same points, and sums
// in the same order (kSumLanes below).  The exceptions: reciprocal_1_to_2 (silu's), the same to
// within fp32 rounding, and AVX512-BF16's rounding to bf16, which flushes fp32 denormals.
//
// +, - and * on Vec are GCC's (and Clang's) lane-wise vector operators, each rounded on its own
// (-ffp-contract=off); fmadd is the one fused form.  Without AVX2, FMA and F16C, ENGINE_CPU_ISA
// stays undefined and a kernel file compiles to a stub (`#if defined(ENGINE_CPU_ISA)`).
//
// Everything here has internal linkage (an unnamed namespace): the builds are separate libraries
// that may be loaded into one process, and each must call its own copies, never another build's.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__) && \
    defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define ENGINE_CPU_AVX512 1
#if defined(__AVX512BF16__)
#define ENGINE_CPU_ISA "avx512_bf16"
#else
#define ENGINE_CPU_ISA "avx512"
#endif
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define ENGINE_CPU_ISA "avx2"
#endif

#if defined(ENGINE_CPU_ISA)
#include <immintrin.h>

namespace engine_cpu {
namespace {

// The sum of 8 fp32 lanes in a fixed tree: halves, then quarters, then pairs.
inline float reduce_add8(__m256 x) {
  __m128 sum = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  sum = _mm_add_ps(sum, _mm_movehl_ps(sum, sum));
  return _mm_cvtss_f32(_mm_add_ss(sum, _mm_movehdup_ps(sum)));
}

enum DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// The KV cache's rows (engine/kernels/kv_cache_format.py), for the kernels that read or write
// them (paged_decode_attention.cpp, decode_layer.cpp): an int8 row is head_dim values, then their
// fp32 scale; no kernel takes a head longer than kMaxHeadDim.
constexpr int64_t kKvScaleBytes = sizeof(float);
constexpr int kMaxHeadDim = 256;

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

#if defined(ENGINE_CPU_AVX512)

constexpr int kLanes = 16;
using Vec = __m512;
using Mask = __mmask16;  // live lanes of a row tail
using Bits = __m512i;    // 32-bit integer lanes

// Lanes [0, n) of a vector, for row tails (none for n <= 0).
inline Mask lanes(int64_t n) {
  return n >= kLanes ? 0xffff : n <= 0 ? 0 : static_cast<Mask>((1u << n) - 1);
}

inline Vec splat(float x) { return _mm512_set1_ps(x); }
inline Vec fmadd(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }  // a b + c, rounded once
inline Vec fnmadd(Vec a, Vec b, Vec c) { return _mm512_fnmadd_ps(a, b, c); }  // c - a b, rounded once
inline Vec max(Vec a, Vec b) { return _mm512_max_ps(a, b); }
inline Vec abs(Vec x) { return _mm512_abs_ps(x); }
inline Vec round_to_integer(Vec x) {
  return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
// The halves added, then the AVX2 build's tree: not _mm512_reduce_add_ps, whose order is the
// compiler's to choose.
inline float reduce_add(Vec x) {
  return reduce_add8(_mm256_add_ps(_mm512_castps512_ps256(x), _mm512_extractf32x8_ps(x, 1)));
}
// Lanes where x < 0 take if_negative, the others (and NaN) otherwise.
inline Vec select_negative(Vec x, Vec if_negative, Vec otherwise) {
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ), otherwise, if_negative);
}
// value where x >= bound, 0 where x < bound or is NaN.
inline Vec zero_below(Vec x, float bound, Vec value) {
  return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, splat(bound), _CMP_GE_OQ), value);
}
inline Vec keep(Mask live, Vec x) { return _mm512_maskz_mov_ps(live, x); }  // dead lanes -> 0
// 1 / d for d in [1, 2]: the 14-bit estimate and one Newton step (~1e-8 relative, before fp32's
// own rounding), a third of a division's cost.
inline Vec reciprocal_1_to_2(Vec d) {
  const Vec r = _mm512_rcp14_ps(d);
  return r * fnmadd(d, r, splat(2.0f));
}
// 2^n for integral n in [-126, 127], as fp32 (its exponent field, built directly).
inline Vec pow2(Vec n) {
  const Bits biased = _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127));
  return _mm512_castsi512_ps(_mm512_slli_epi32(biased, 23));
}

// 16-bit values -> fp32 lanes: bf16 is the high half of an fp32, fp16 converts.
inline Vec widen(__m256i raw, DType dtype) {
  if (dtype == kFloat16) return _mm512_cvtph_ps(raw);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
inline Vec load(const float* p, DType) { return _mm512_loadu_ps(p); }
inline Vec load(const uint16_t* p, DType dtype) {
  return widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), dtype);
}
inline Vec load(const float* p, DType, Mask live) { return _mm512_maskz_loadu_ps(live, p); }
// int8 values (an int8 KV cache's, engine/kernels/kv_cache_format.py) -> fp32, exactly.
inline Vec load(const int8_t* p, DType) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline Vec load(const uint16_t* p, DType dtype, Mask live) {
  return widen(_mm256_maskz_loadu_epi16(live, p), dtype);
}

// bf16 bits of fp32 lanes (in each lane's low half), rounded to nearest even; NaN stays NaN
// (quiet bit set).
inline Bits bf16_bits(Vec x) {
  const Bits bits = _mm512_castps_si512(x);
  const Bits lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  Bits rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_or_si512(bits, _mm512_set1_epi32(0x400000)));
  return _mm512_srli_epi32(rounded, 16);
}

// fp32 lanes -> bf16 or fp16 values, rounded to nearest even.  With AVX512-BF16 one instruction
// does the bf16 rounding that bf16_bits spells out (NaN stays NaN), except that it flushes fp32
// denormals (below 1.2e-38, which activations never are) to zero.
inline __m256i narrow(Vec x, DType dtype) {
  if (dtype == kFloat16) return _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#if defined(__AVX512BF16__)
  return (__m256i)_mm512_cvtneps_pbh(x);
#else
  return _mm512_cvtepi32_epi16(bf16_bits(x));
#endif
}
inline void store(float* p, Vec x, DType) { _mm512_storeu_ps(p, x); }
inline void store(uint16_t* p, Vec x, DType dtype) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), narrow(x, dtype));
}
inline void store(float* p, Vec x, DType, Mask live) { _mm512_mask_storeu_ps(p, live, x); }
inline void store(uint16_t* p, Vec x, DType dtype, Mask live) {
  _mm256_mask_storeu_epi16(p, live, narrow(x, dtype));
}

#else  // AVX2, FMA, F16C

constexpr int kLanes = 8;
using Vec = __m256;
using Bits = __m256i;
// Live lanes of a row tail: AVX2 has no mask registers, and no masked loads of 16-bit values, so
// a tail goes through a small buffer (once a row; full vectors take the plain load).
struct Mask {
  int count;
};

inline Mask lanes(int64_t n) { return Mask{n >= kLanes ? kLanes : n <= 0 ? 0 : static_cast<int>(n)}; }

inline Vec splat(float x) { return _mm256_set1_ps(x); }
inline Vec fmadd(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline Vec fnmadd(Vec a, Vec b, Vec c) { return _mm256_fnmadd_ps(a, b, c); }
inline Vec max(Vec a, Vec b) { return _mm256_max_ps(a, b); }
inline Vec abs(Vec x) { return _mm256_andnot_ps(splat(-0.0f), x); }
inline Vec round_to_integer(Vec x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline float reduce_add(Vec x) { return reduce_add8(x); }
inline Vec select_negative(Vec x, Vec if_negative, Vec otherwise) {
  return _mm256_blendv_ps(otherwise, if_negative, _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_LT_OQ));
}
inline Vec zero_below(Vec x, float bound, Vec value) {
  return _mm256_and_ps(_mm256_cmp_ps(x, splat(bound), _CMP_GE_OQ), value);
}
inline Vec keep(Mask live, Vec x) {
  if (live.count >= kLanes) return x;
  const Bits index = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_and_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(live.count), index)), x);
}
// 1 / d for d in [1, 2], correctly rounded.  AVX2's estimate has only 12 bits and would need two
// Newton steps; a division measured faster here (silu_and_mul of 32 x 1536 bf16, one thread,
// Zen 5: 68 us against 77).  So this build's silu differs from AVX-512's in the last fp32 bits.
inline Vec reciprocal_1_to_2(Vec d) { return _mm256_div_ps(splat(1.0f), d); }
inline Vec pow2(Vec n) {
  const Bits biased = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
  return _mm256_castsi256_ps(_mm256_slli_epi32(biased, 23));
}

inline Vec widen(__m128i raw, DType dtype) {
  if (dtype == kFloat16) return _mm256_cvtph_ps(raw);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}
inline Vec load(const float* p, DType) { return _mm256_loadu_ps(p); }
inline Vec load(const uint16_t* p, DType dtype) {
  return widen(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)), dtype);
}
inline Vec load(const int8_t* p, DType) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
template <typename T>
inline Vec load(const T* p, DType dtype, Mask live) {
  if (live.count >= kLanes) return load(p, dtype);
  T tail[kLanes] = {};  // dead lanes read 0, as AVX-512's zero-masked loads do
  std::memcpy(tail, p, live.count * sizeof(T));
  return load(tail, dtype);
}

inline Bits bf16_bits(Vec x) {
  const Bits bits = _mm256_castps_si256(x);
  const Bits lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const Bits rounded = _mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
  const Bits quiet_nan = _mm256_or_si256(bits, _mm256_set1_epi32(0x400000));
  const Bits nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
  return _mm256_srli_epi32(_mm256_blendv_epi8(rounded, quiet_nan, nan), 16);
}

inline __m128i narrow(Vec x, DType dtype) {
  if (dtype == kFloat16) return _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const Bits bits = bf16_bits(x);  // each lane <= 0xffff: the unsigned saturating pack is exact
  return _mm_packus_epi32(_mm256_castsi256_si128(bits), _mm256_extracti128_si256(bits, 1));
}
inline void store(float* p, Vec x, DType) { _mm256_storeu_ps(p, x); }
inline void store(uint16_t* p, Vec x, DType dtype) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), narrow(x, dtype));
}
template <typename T>
inline void store(T* p, Vec x, DType dtype, Mask live) {
  if (live.count >= kLanes) return store(p, x, dtype);
  T tail[kLanes];
  store(tail, x, dtype);
  std::memcpy(p, tail, live.count * sizeof(T));
}

#endif  // ENGINE_CPU_AVX512

// A sum across lanes that every build adds in the same order, so that their results are bit for
// bit the same: 16 partial sums (one vector under AVX-512; two under AVX2, lanes 0-7 and 8-15),
// then one tree (the halves added, then reduce_add8's).  A loop that sums steps kSumLanes
// elements at a time and adds vector j of each step into partial[j].
constexpr int kSumLanes = 16;
constexpr int kSumVecs = kSumLanes / kLanes;
inline float reduce_add(const Vec (&partial)[kSumVecs]) {
  Vec total = partial[0];
  for (int j = 1; j < kSumVecs; j++) total = total + partial[j];  // AVX-512's reduce_add adds its halves first
  return reduce_add(total);
}

// x rounded to the dtype's precision, still as fp32: what torch computes when an op's fp32
// result is stored in a bf16 or fp16 tensor and the next op reads it back.
inline Vec round_to(DType dtype, Vec x) { return dtype == kFloat32 ? x : widen(narrow(x, dtype), dtype); }

// exp(x) for x <= 0: 2^n * p(r), n = round(x / ln 2), r = x - n ln 2 in [-ln2/2, ln2/2], p the
// degree-6 Taylor polynomial (relative error ~2e-7); 0 below -87, where exp leaves fp32's normal
// range (so n >= -126 and 2^n is a normal fp32).  The same operations in every build: the same
// results.
inline Vec exp_nonpositive(Vec input) {
  const Vec x = max(input, splat(-87.0f));
  const Vec n = round_to_integer(x * splat(1.44269504f));
  Vec r = fnmadd(n, splat(0.693145752f), x);  // ln 2 split in two for accuracy
  r = fnmadd(n, splat(1.42860677e-6f), r);
  Vec p = splat(1.0f / 720);
  p = fmadd(p, r, splat(1.0f / 120));
  p = fmadd(p, r, splat(1.0f / 24));
  p = fmadd(p, r, splat(1.0f / 6));
  p = fmadd(p, r, splat(0.5f));
  p = fmadd(p, r, splat(1.0f));
  p = fmadd(p, r, splat(1.0f));
  return zero_below(input, -87.0f, p * pow2(n));
}

}  // namespace
}  // namespace engine_cpu

#endif  // ENGINE_CPU_ISA
