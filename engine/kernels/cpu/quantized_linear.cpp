// Weight-only quantized linear layers for CPU decode: y = x W^T (+ bias), with W kept as the GGUF
// file's blocks and dequantized inside the kernel, one block at a time (llama.cpp's idea, without
// its quantization of the activations).
//
// Why: decode reads every weight once per step; Q4_1 blocks are 20 bytes per 32 weights against
// 64 for bf16, so a GEMV that reads the blocks where they lie reads 3.2x fewer bytes.
//
// Block layouts (32 weights along in_features, little-endian fp16 scales):
//   Q4_0  18 bytes  fp16 d, 16 bytes qs          w[j] = d * (q[j] - 8)
//   Q4_1  20 bytes  fp16 d, fp16 m, 16 bytes qs  w[j] = d * q[j] + m
//   Q8_0  34 bytes  fp16 d, 32 int8 q            w[j] = d * q[j]
// In Q4, q[j] for j < 16 is the low nibble of qs[j], q[16 + j] its high nibble.
// A weight is rows of blocks: row r (output feature r) at weight + r * weight_stride; a prefix view
// (the first n rows, the first k_blocks blocks of each) is the same pointer and stride.
//
// Numerics: every weight is dequantized exactly as gguf's reference does in fp32 (d * q is exact
// in fp32, so fma(d, q, m) rounds once, like d * q + m), the activations are read as fp32, and
// the products are summed in fp32; only the output is rounded to the activations' dtype (round to
// nearest even).  So y equals x.float() @ dequantized(W).T up to fp32 summation order.  That order
// is the same in every build, tile and batch: partial sum j (of kSumLanes = 16) adds element
// 32 b + j, then 32 b + 16 + j, block after block, and a tree of halves adds the 16 up.  So the
// AVX2, AVX-512 and scalar builds give the same bits, and a row's result does not depend on which
// other rows share its call.
//
// Work split: OpenMP threads (torch's runtime) take contiguous ranges of output rows, so the
// weights are read once in all.  Within a thread, a tile of NR output rows times MR rows of x
// keeps MR * NR accumulators (16 lanes each: one zmm, or two ymm) in registers (tile_rows):
//   m <= 4   (decode GEMV and small batches): each block is dequantized into registers and used
//            for all m rows at once ("fused"); MR x NR = 1 x 8, then m x 4 (AVX2: 1 x 2, 2 x 2,
//            m x 1), the next tiles' blocks prefetched;
//   m >  4   each thread dequantizes NR rows into an fp32 panel (L1) once, then runs 4-row tiles
//            of x over it (4 x 4; AVX2 4 x 1), so a block is dequantized once per pass, not once
//            per 4 rows.
// x is converted to fp32 once per pass into a per-thread buffer (nothing to do for fp32 x); a
// pass is as many rows of x as fit in kPassBytes, so that a large prefill chunk stays in L2.
//
// Measured on the 2-core dev machine (benchmarks/quantized_linear.py, one core, weights from
// memory): M=1 reads Q4_1 at ~12-15 GB/s and Q8_0 at ~18-29 (torch's bf16 GEMV ~7-12), M=4 runs
// 2-3x faster than torch bf16; from M ~16 torch's bf16 GEMM (AVX512-BF16 dot products of bf16
// weights, 2x the fp32 FMA rate) is 1.5-2.5x faster: this kernel's tiles reach ~130-150 GFLOP/s
// of the core's ~165 fp32 peak.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif
#include "thread_share.h"

namespace {

constexpr int kBlock = 32;            // weights per block, in every format
constexpr int kMaxFusedRows = 4;      // rows of x up to which blocks are dequantized into registers
constexpr int64_t kPassBytes = 512 << 10;  // fp32 rows of x per pass: in L2 beside the panel
// Below this many (x row, weight block) products one thread is faster than waking the second.
constexpr int64_t kParallelWork = 4096;

enum Format : int { kQ4_0 = 0, kQ4_1 = 1, kQ8_0 = 2 };
enum DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

inline uint16_t load_u16(const void* p) {
  uint16_t value;
  std::memcpy(&value, p, sizeof value);
  return value;
}

inline float bits_to_float(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

inline float fp16_to_float(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  const uint32_t sign = uint32_t(h & 0x8000) << 16, exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff;
  if (exponent == 0x1f) return bits_to_float(sign | 0x7f800000 | (mantissa << 13));
  if (exponent != 0) return bits_to_float(sign | ((exponent + 112) << 23) | (mantissa << 13));
  const float subnormal = float(mantissa) * (1.0f / 16777216.0f);  // mantissa * 2^-24, exact
  return sign ? -subnormal : subnormal;
#endif
}

// Round to nearest even; NaN stays NaN.
inline uint16_t float_to_fp16(float value) {
#if defined(__F16C__)
  return _cvtss_sh(value, _MM_FROUND_TO_NEAREST_INT);
#else
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  const uint16_t sign = uint16_t((bits >> 16) & 0x8000);
  const uint32_t magnitude = bits & 0x7fffffff;
  if (magnitude > 0x7f800000) return sign | 0x7e00;
  if (magnitude >= 0x477ff000) return sign | 0x7c00;  // 65520 and up round to infinity
  if (magnitude < 0x38800000)  // below 2^-14: a subnormal, value / 2^-24 rounded to an integer
    return sign | uint16_t(std::nearbyint(bits_to_float(magnitude) * 16777216.0f));
  return sign | uint16_t((magnitude + 0xfff + ((magnitude >> 13) & 1) - (112u << 23)) >> 13);
#endif
}

// Round to nearest even; NaN stays NaN (quiet bit set).
inline uint16_t float_to_bf16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  if ((bits & 0x7fffffff) > 0x7f800000) return uint16_t((bits | 0x400000) >> 16);
  return uint16_t((bits + 0x7fff + ((bits >> 16) & 1)) >> 16);
}

// ---- vectors of fp32 lanes: 16 (AVX-512), 8 (AVX2), or 1 (anything else) ----

#if defined(__AVX512F__)
constexpr int kLanes = 16;
using Vec = __m512;
inline Vec zero() { return _mm512_setzero_ps(); }
inline Vec set1(float v) { return _mm512_set1_ps(v); }
inline Vec load(const float* p) { return _mm512_loadu_ps(p); }
inline void store(float* p, Vec v) { _mm512_storeu_ps(p, v); }
inline Vec add(Vec a, Vec b) { return _mm512_add_ps(a, b); }
inline Vec mul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
inline Vec fmadd(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
// out[j] = the sum of acc[j]'s lanes, for count <= 16 vectors: halves first (lane l + lane l + 8,
// then l + 4, l + 2, l + 1), as a transpose tree: 45 shuffles and adds for 16 vectors where
// reducing each alone takes 8 apiece.
inline void sum_lanes(const Vec* acc, int count, float* out) {
  Vec v[16], s1[8], s2[4], s3[2];
  for (int j = 0; j < 16; j++) v[j] = j < count ? acc[j] : zero();
  for (int j = 0; j < 8; j++)  // 256-bit halves: acc[2j] | acc[2j + 1], 8 partial sums each
    s1[j] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * j], v[2 * j + 1], 0x44),
                          _mm512_shuffle_f32x4(v[2 * j], v[2 * j + 1], 0xee));
  for (int j = 0; j < 4; j++)  // 128-bit lane L: acc[4j + L], 4 partial sums
    s2[j] = _mm512_add_ps(_mm512_shuffle_f32x4(s1[2 * j], s1[2 * j + 1], 0x88),
                          _mm512_shuffle_f32x4(s1[2 * j], s1[2 * j + 1], 0xdd));
  for (int j = 0; j < 2; j++)  // lane L: acc[8j + L] twice, acc[8j + 4 + L] twice
    s3[j] = _mm512_add_ps(_mm512_shuffle_ps(s2[2 * j], s2[2 * j + 1], 0x44),
                          _mm512_shuffle_ps(s2[2 * j], s2[2 * j + 1], 0xee));
  // element 4L + t: acc[4t + L]; put element j at j
  const Vec sums = _mm512_add_ps(_mm512_shuffle_ps(s3[0], s3[1], 0x88), _mm512_shuffle_ps(s3[0], s3[1], 0xdd));
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  _mm512_mask_storeu_ps(out, __mmask16((1u << count) - 1), _mm512_permutexvar_ps(order, sums));
}
// The fp16 scale at p in every lane.
inline Vec scale(const uint8_t* p) { return _mm512_cvtph_ps(_mm256_set1_epi16(short(load_u16(p)))); }
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
constexpr int kLanes = 8;
using Vec = __m256;
inline Vec zero() { return _mm256_setzero_ps(); }
inline Vec set1(float v) { return _mm256_set1_ps(v); }
inline Vec load(const float* p) { return _mm256_loadu_ps(p); }
inline void store(float* p, Vec v) { _mm256_storeu_ps(p, v); }
inline Vec add(Vec a, Vec b) { return _mm256_add_ps(a, b); }
inline Vec mul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
inline Vec fmadd(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
// out[j] = the sum of acc[j]'s lanes, for count <= 8 vectors: halves first (l + 4, l + 2, l + 1),
// as a transpose tree, the same order as AVX-512's below its first step.
inline void sum_lanes(const Vec* acc, int count, float* out) {
  Vec v[8], s1[4], s2[2];
  for (int j = 0; j < 8; j++) v[j] = j < count ? acc[j] : zero();
  for (int j = 0; j < 4; j++)  // 128-bit halves: acc[2j] | acc[2j + 1], 4 partial sums each
    s1[j] = _mm256_add_ps(_mm256_permute2f128_ps(v[2 * j], v[2 * j + 1], 0x20),
                          _mm256_permute2f128_ps(v[2 * j], v[2 * j + 1], 0x31));
  for (int j = 0; j < 2; j++)  // lane L: acc[4j + L] twice, acc[4j + 2 + L] twice
    s2[j] = _mm256_add_ps(_mm256_shuffle_ps(s1[2 * j], s1[2 * j + 1], 0x44),
                          _mm256_shuffle_ps(s1[2 * j], s1[2 * j + 1], 0xee));
  // element 4L + t: acc[2t + L]
  const Vec sums = _mm256_add_ps(_mm256_shuffle_ps(s2[0], s2[1], 0x88), _mm256_shuffle_ps(s2[0], s2[1], 0xdd));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, sums);
  for (int j = 0; j < count; j++) out[j] = lanes[4 * (j % 2) + j / 2];
}
inline Vec scale(const uint8_t* p) { return _mm256_cvtph_ps(_mm_set1_epi16(short(load_u16(p)))); }
#else
constexpr int kLanes = 1;
using Vec = float;
inline Vec zero() { return 0.0f; }
inline Vec set1(float v) { return v; }
inline Vec load(const float* p) { return *p; }
inline void store(float* p, Vec v) { *p = v; }
inline Vec add(Vec a, Vec b) { return a + b; }
inline Vec mul(Vec a, Vec b) { return a * b; }
inline Vec fmadd(Vec a, Vec b, Vec c) { return std::fma(a, b, c); }  // fused, as the vector paths
inline void sum_lanes(const Vec* acc, int count, float* out) {
  for (int j = 0; j < count; j++) out[j] = acc[j];
}
inline Vec scale(const uint8_t* p) { return fp16_to_float(load_u16(p)); }
#endif

// v, kept in a register (the compiler may no longer fold the load that produced it into each use).
inline Vec in_register(Vec v) {
#if defined(__AVX2__)
  asm("" : "+v"(v));
#endif
  return v;
}

constexpr int kChunks = kBlock / kLanes;  // vectors per block
using BlockWeights = Vec[kChunks];       // one block's 32 weights as fp32, in order
constexpr int kSumLanes = 16;              // partial sums per dot product, in every build
constexpr int kSumVecs = kSumLanes / kLanes;  // vectors per accumulator
using Accumulator = Vec[kSumVecs];
constexpr int kRegisters = kLanes == 16 ? 32 : 16;

// The 16 partial sums as one vector's worth (kLanes): halves first, as sum_lanes goes on.
inline Vec fold(const Accumulator& partial) {
  Vec p[kSumVecs];
  for (int j = 0; j < kSumVecs; j++) p[j] = partial[j];
  for (int width = kSumVecs / 2; width >= 1; width /= 2)
    for (int j = 0; j < width; j++) p[j] = add(p[j], p[j + width]);
  return p[0];
}

// ---- dequantizing one block into registers ----

// w = d * q + m for the 32 nibbles of qs.
inline void q4_weights(const uint8_t* qs, Vec d, Vec m, BlockWeights& w) {
#if defined(__AVX512F__)
  const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs)));
  w[0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(bytes, _mm512_set1_epi32(0xf))), d, m);
  w[1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(bytes, 4)), d, m);
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
  const __m256i low = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(qs)));
  const __m256i high = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(qs + 8)));
  const __m256i nibble = _mm256_set1_epi32(0xf);
  w[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(low, nibble)), d, m);
  w[1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(high, nibble)), d, m);
  w[2] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(low, 4)), d, m);
  w[3] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(high, 4)), d, m);
#else
  for (int j = 0; j < kBlock / 2; j++) {
    w[j] = d * float(qs[j] & 0xf) + m;
    w[j + kBlock / 2] = d * float(qs[j] >> 4) + m;
  }
#endif
}

struct Q4_0 {
  static constexpr int64_t kBytes = 18;
  static void dequantize(const uint8_t* block, BlockWeights& w) {
    const Vec d = scale(block);
    q4_weights(block + 2, d, mul(d, set1(-8.0f)), w);  // d * (q - 8) = d * q + (-8 d), all exact
  }
};

struct Q4_1 {
  static constexpr int64_t kBytes = 20;
  static void dequantize(const uint8_t* block, BlockWeights& w) {
    q4_weights(block + 4, scale(block), scale(block + 2), w);
  }
};

struct Q8_0 {
  static constexpr int64_t kBytes = 34;
  static void dequantize(const uint8_t* block, BlockWeights& w) {
    const Vec d = scale(block);
    const uint8_t* qs = block + 2;
#if defined(__AVX512F__)
    for (int c = 0; c < kChunks; c++) {
      const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs + c * kLanes));
      w[c] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)), d);
    }
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
    for (int c = 0; c < kChunks; c++) {
      const __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(qs + c * kLanes));
      w[c] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), d);
    }
#else
    for (int j = 0; j < kBlock; j++) w[j] = d * float(static_cast<int8_t>(qs[j]));
#endif
  }
};

// ---- where a tile's weight rows come from ----

// NR rows of quantized blocks, dequantized as the tile reaches each block.  Rows past the
// matrix's last point at its last row (computed, never stored).
template <class F, int NR>
struct QuantizedRows {
  const uint8_t* row[NR];
  int64_t prefetch_ahead;  // bytes from a block to the same block two tiles on
  void block(int r, int64_t b, BlockWeights& w) const {
    const uint8_t* block = row[r] + b * F::kBytes;
    // PERF: a row is a few cache lines and a tile reads NR of them side by side, too short for the
    // hardware prefetcher to follow: without this a GEMV from memory read Q8_0 at ~5 GB/s and Q4_0
    // at ~4 on one core, with it ~25 and ~12 (Q4_1 10 -> 14).  Never faults, past the end either.
    __builtin_prefetch(block + prefetch_ahead);
    F::dequantize(block, w);
  }
};

// NR rows already dequantized into a panel of fp32 rows.
template <int NR>
struct PanelRows {
  const float* row[NR];
  void block(int r, int64_t b, BlockWeights& w) const {
    for (int c = 0; c < kChunks; c++) w[c] = in_register(load(row[r] + b * kBlock + c * kLanes));
  }
};

// sums[i * NR + r] = x[i, :] . w[r, :] over k_blocks blocks, for MR rows of x (x_stride apart) and the
// NR weight rows of `rows`: MR * NR accumulators, each block's weights used for all MR rows.
template <int MR, int NR, class Rows>
inline void dot_tile(const Rows& rows, const float* x, int64_t x_stride, int64_t k_blocks, float (&sums)[MR * NR]) {
  static_assert(MR * NR <= kLanes || kLanes == 1, "sum_lanes reduces at most one vector's worth of accumulators");
  // PERF: x's block in registers, loaded once for the NR rows, where they fit: left to itself GCC
  // folds the loads into the FMAs, and a 4 x 4 AVX-512 tile loaded 40 vectors per 32 FMAs and
  // waited on loads (M=64, K=576: ~110 -> ~145 GFLOP/s on one core).
  constexpr bool kXInRegisters = MR * kChunks + MR * NR * kSumVecs + kChunks + 2 <= kRegisters;
  Accumulator acc[MR][NR];
  for (int i = 0; i < MR; i++)
    for (int r = 0; r < NR; r++)
      for (int v = 0; v < kSumVecs; v++) acc[i][r][v] = zero();
  for (int64_t b = 0; b < k_blocks; b++) {
    Vec xb[MR][kChunks];
    for (int i = 0; i < MR; i++)
      for (int c = 0; c < kChunks; c++) {
        xb[i][c] = load(x + i * x_stride + b * kBlock + c * kLanes);
        if (kXInRegisters) xb[i][c] = in_register(xb[i][c]);
      }
    for (int r = 0; r < NR; r++) {
      BlockWeights w;
      rows.block(r, b, w);
      for (int i = 0; i < MR; i++)
        for (int c = 0; c < kChunks; c++) {
          Vec& partial = acc[i][r][c % kSumVecs];  // element 32 b + 16 h + j goes to partial sum j
          partial = fmadd(w[c], xb[i][c], partial);
        }
    }
  }
  Vec totals[MR * NR];
  for (int i = 0; i < MR; i++)
    for (int r = 0; r < NR; r++) totals[i * NR + r] = fold(acc[i][r]);
  sum_lanes(totals, MR * NR, sums);
}

// Output rows per tile for MR rows of x: enough independent accumulators to hide the FMA latency,
// few enough to stay in registers (32 zmm with AVX-512; 16 ymm with AVX2, two per accumulator).
constexpr int tile_rows(int mr) {
  return kLanes == 16 ? (mr == 1 ? 8 : 4) : kLanes == 8 ? (mr == 1 ? 2 : 1) : 1;
}
constexpr int kPanelRows = tile_rows(kMaxFusedRows);

// ---- the call ----

struct Problem {
  const void* x;
  int64_t x_stride;  // elements between rows of x
  const uint8_t* weight;
  int64_t weight_stride;  // bytes between weight rows
  const void* bias;       // [n] in the activations' dtype, or null
  void* out;
  int64_t out_stride;  // elements between rows of out
  int64_t m, n, k_blocks;
  DType dtype;  // of x, bias and out
};

inline float read(const void* data, int64_t index, DType dtype) {
  if (dtype == kFloat32) return static_cast<const float*>(data)[index];
  const uint16_t bits = static_cast<const uint16_t*>(data)[index];
  return dtype == kBFloat16 ? bits_to_float(uint32_t(bits) << 16) : fp16_to_float(bits);
}

// out[m0 + i, n0 + r] = sums[i * NR + r] + bias[n0 + r], for the live rows and columns of a tile.
template <int MR, int NR>
void write_tile(const Problem& p, int64_t m0, int64_t n0, const float (&sums)[MR * NR], int live_rows) {
  float bias[NR] = {};
  if (p.bias)
    for (int r = 0; r < live_rows; r++) bias[r] = read(p.bias, n0 + r, p.dtype);
  for (int i = 0; i < MR; i++) {
    const int64_t first = (m0 + i) * p.out_stride + n0;
    const float* row = sums + i * NR;
    if (p.dtype == kFloat32) {  // one loop per dtype: no branch per element
      for (int r = 0; r < live_rows; r++) static_cast<float*>(p.out)[first + r] = row[r] + bias[r];
    } else if (p.dtype == kBFloat16) {
      for (int r = 0; r < live_rows; r++) static_cast<uint16_t*>(p.out)[first + r] = float_to_bf16(row[r] + bias[r]);
    } else {
      for (int r = 0; r < live_rows; r++) static_cast<uint16_t*>(p.out)[first + r] = float_to_fp16(row[r] + bias[r]);
    }
  }
}

// A per-thread buffer of at least `size` floats; slot 0 holds x, slot 1 the panel.
inline float* scratch(int slot, int64_t size) {
  static thread_local std::vector<float> buffers[2];
  if (int64_t(buffers[slot].size()) < size) buffers[slot].resize(size);
  return buffers[slot].data();
}

// Rows [m0, m0 + rows) of x as fp32 rows, *stride apart.
const float* fp32_rows(const Problem& p, int64_t m0, int64_t rows, int64_t* stride) {
  if (p.dtype == kFloat32) {
    *stride = p.x_stride;
    return static_cast<const float*>(p.x) + m0 * p.x_stride;
  }
  const int64_t k = p.k_blocks * kBlock;
  float* x = scratch(0, rows * k);
  for (int64_t i = 0; i < rows; i++) {
    const uint16_t* row = static_cast<const uint16_t*>(p.x) + (m0 + i) * p.x_stride;
    if (p.dtype == kBFloat16) {  // a loop of its own, so that it vectorizes
      for (int64_t j = 0; j < k; j++) x[i * k + j] = bits_to_float(uint32_t(row[j]) << 16);
    } else {
      for (int64_t j = 0; j < k; j++) x[i * k + j] = fp16_to_float(row[j]);
    }
  }
  *stride = k;
  return x;
}

// Rows [m0, m0 + MR) of out, each block dequantized into registers and used for all MR rows.
template <class F, int MR>
void fused_pass(const Problem& p, const float* x, int64_t x_stride, int64_t m0) {
  constexpr int NR = tile_rows(MR);
  int64_t begin, end;
  thread_share((p.n + NR - 1) / NR, &begin, &end);
  for (int64_t tile = begin; tile < end; tile++) {
    const int64_t n0 = tile * NR;
    QuantizedRows<F, NR> rows;
    rows.prefetch_ahead = 2 * NR * p.weight_stride;
    for (int r = 0; r < NR; r++) rows.row[r] = p.weight + std::min(n0 + r, p.n - 1) * p.weight_stride;
    float sums[MR * NR];
    dot_tile<MR, NR>(rows, x, x_stride, p.k_blocks, sums);
    write_tile<MR, NR>(p, m0, n0, sums, int(std::min<int64_t>(NR, p.n - n0)));
  }
}

template <int MR>
void panel_tile(const Problem& p, const PanelRows<kPanelRows>& rows, const float* x, int64_t x_stride, int64_t m0,
                int64_t n0, int live_rows) {
  float sums[MR * kPanelRows];
  dot_tile<MR, kPanelRows>(rows, x, x_stride, p.k_blocks, sums);
  write_tile<MR, kPanelRows>(p, m0, n0, sums, live_rows);
}

// Rows [m0, m0 + rows) of out: per tile of kPanelRows weight rows, dequantize them once into the
// panel, then run every 4 rows of x over it.
template <class F>
void panel_pass(const Problem& p, const float* x, int64_t x_stride, int64_t m0, int64_t rows) {
  const int64_t k = p.k_blocks * kBlock;
  float* panel = scratch(1, kPanelRows * k);
  int64_t begin, end;
  thread_share((p.n + kPanelRows - 1) / kPanelRows, &begin, &end);
  for (int64_t tile = begin; tile < end; tile++) {
    const int64_t n0 = tile * kPanelRows;
    const int live_rows = int(std::min<int64_t>(kPanelRows, p.n - n0));
    PanelRows<kPanelRows> panel_rows;
    for (int r = 0; r < kPanelRows; r++) {
      panel_rows.row[r] = panel + std::min(r, live_rows - 1) * k;
      if (r >= live_rows) continue;
      const uint8_t* blocks = p.weight + (n0 + r) * p.weight_stride;
      for (int64_t b = 0; b < p.k_blocks; b++) {
        BlockWeights w;
        F::dequantize(blocks + b * F::kBytes, w);
        for (int c = 0; c < kChunks; c++) store(panel + r * k + b * kBlock + c * kLanes, w[c]);
      }
    }
    int64_t i = 0;
    for (; i + 4 <= rows; i += 4) panel_tile<4>(p, panel_rows, x + i * x_stride, x_stride, m0 + i, n0, live_rows);
    switch (rows - i) {
      case 3: panel_tile<3>(p, panel_rows, x + i * x_stride, x_stride, m0 + i, n0, live_rows); break;
      case 2: panel_tile<2>(p, panel_rows, x + i * x_stride, x_stride, m0 + i, n0, live_rows); break;
      case 1: panel_tile<1>(p, panel_rows, x + i * x_stride, x_stride, m0 + i, n0, live_rows); break;
    }
  }
}

template <class F>
void linear(const Problem& p, int num_threads) {
  const int64_t k = std::max<int64_t>(p.k_blocks * kBlock, 1);
  const int64_t pass_rows = std::max<int64_t>(4, kPassBytes / int64_t(sizeof(float)) / k / 4 * 4);
#pragma omp parallel num_threads(num_threads) if (p.m * p.n * p.k_blocks >= kParallelWork)
  for (int64_t m0 = 0; m0 < p.m; m0 += pass_rows) {
    const int64_t rows = std::min(pass_rows, p.m - m0);
    int64_t x_stride;
    const float* x = fp32_rows(p, m0, rows, &x_stride);  // each thread its own copy: no barrier
    switch (rows) {
      case 1: fused_pass<F, 1>(p, x, x_stride, m0); break;
      case 2: fused_pass<F, 2>(p, x, x_stride, m0); break;
      case 3: fused_pass<F, 3>(p, x, x_stride, m0); break;
      case 4: fused_pass<F, 4>(p, x, x_stride, m0); break;
      default: panel_pass<F>(p, x, x_stride, m0, rows);
    }
  }
}

}  // namespace

extern "C" {

// out[i, j] = sum over k < 32 k_blocks of x[i, k] * W[j, k] (+ bias[j]), for i < m, j < n.
// x [m, >= 32 k_blocks] rows x_stride elements apart; weight: n rows of k_blocks blocks of
// `format`, rows weight_stride bytes apart; bias [n] or null; out rows out_stride elements apart.
// x, bias and out share `dtype`.  Returns 0, or -1 for a format, dtype or count it does not handle.
int quantized_linear(const void* x, int64_t x_stride, const uint8_t* weight, int64_t weight_stride,
                     const void* bias, void* out, int64_t out_stride, int64_t m, int64_t n, int64_t k_blocks,
                     int format, int dtype, int num_threads) {
  if (m < 0 || n < 0 || k_blocks < 0 || dtype < kFloat32 || dtype > kFloat16) return -1;
  if (m == 0 || n == 0) return 0;
  const Problem p{x, x_stride, weight, weight_stride, bias, out, out_stride, m, n, k_blocks, DType(dtype)};
  switch (format) {
    case kQ4_0: linear<Q4_0>(p, num_threads); return 0;
    case kQ4_1: linear<Q4_1>(p, num_threads); return 0;
    case kQ8_0: linear<Q8_0>(p, num_threads); return 0;
    default: return -1;
  }
}

// The fp32 lanes of the vector path compiled in: 16 (AVX-512), 8 (AVX2) or 1 (scalar).
int quantized_linear_lanes(void) { return kLanes; }

}  // extern "C"
