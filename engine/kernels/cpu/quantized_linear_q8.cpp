// The quantized linear with 8-bit activations: y = x W^T (+ bias), W as the GGUF file's
// Q4_0/Q4_1/Q8_0 blocks (quantized_linear.cpp has the layouts), x quantized here to Q8 blocks,
// and each block's dot product computed in integers (llama.cpp's arithmetic, our code).
//
// Why: at 16-64 rows a step is compute-bound, and quantized_linear.cpp's fp32 FMAs (8 products
// an instruction with AVX2) lose to MKL's fp32 GEMM.  maddubs multiplies 32 byte pairs an
// instruction (vpdpbusd with VNNI: 32 products summed into int32 lanes), 4x the products of an
// fp32 FMA; the per-block scaling adds back a quarter of that.  PERF (benchmarks/README.md, one
// thread, AVX2 build, fp32 activations, the model's Q4_1 shapes at 32 rows): 2.8-2.9x MKL's fp32
// GEMM (AVX2) and 3x quantized_linear.cpp.  At 1-4 rows a panel costs more than the dot
// products it feeds (0.66x quantized_linear.cpp at 1 row), so those run a row-major GEMV (below):
// 1.1-1.6x quantized_linear.cpp at 1 row, where decode is memory-bound and its fp32 FMAs are not.
//
// Numerics (quantized_linear_q8.py's reference computes the same, in torch):
//   x, per row and block of 32 (as fp32):  d = max|x| / 127,  id = d ? 1 / d : 0,
//       q[j] = round_half_even(clamp(x[j] * id, -127, 127)),  asum = sum q,  s = d * asum
//   y[i, c] = acc + bias[c], rounded once to x's dtype, acc summed block after block in fp32:
//       isum = sum_j qw[j] qx[j] exactly in int32 (Q4_0: minus 8 asum, as its q - 8)
//       acc = fma(dw * d, float(isum), acc);  Q4_1 only: acc = fma(mw, s, acc)
// Every product and sum of the integer step is exact and every fp32 step is the same operation
// in the same order in every build and variant (AVX2, AVX-512, with or without VNNI) and for every
// batch, so they all give the same bits.
//
// Layout: output columns across the vector lanes (8 with AVX2, 16 with AVX-512).  A thread takes
// a group of kCols weight rows, turns their blocks into a panel in L1 once: per block, 8 steps
// of kCols 32-bit lanes, lane c of step t holding weights 4t..4t+3 of row c as bytes (Q4 as
// 0..15, Q8 as int8), beside their scales.  Then every tile of MR rows of x runs over the panel:
// step t broadcasts x's bytes 4t..4t+3 of each row to every lane and multiplies them with the
// panel row, so each lane sums its own column and nothing is reduced across lanes:
//
//     panel step t:  | w[c0, 4t..4t+3] | w[c1, 4t..4t+3] | ... | w[c7, 4t..4t+3] |   (u8 x 4 a lane)
//     x broadcast:   | x[i, 4t..4t+3]  | x[i, 4t..4t+3]  | ... | x[i, 4t..4t+3]  |   (s8 x 4 a lane)
//     maddubs:       two int16 sums a lane; Q4 adds 8 steps in int16 (8 * 2 * 15 * 127 < 2^15),
//                    then madd(.., 1) to int32; VNNI's dpbusd sums into int32 at once.
//
// Q8_0 weights are signed, and maddubs takes one unsigned operand: |w| times x with w's sign
// (one product pair at most 2 * 128 * 127 < 2^15, so each step is widened to int32 at once).
// With VNNI (no int16 step to saturate) it is x + 128 times w instead, less 128 sum w (Panel).
//
// Packed panels: a thread turns each group's blocks into its panel on every call, which costs as
// much as a third of the products at 32 rows of x (its transposes and scale conversions read
// every weight byte again).  A weight can instead be packed once, at load, into every group's
// panel side by side (quantized_linear_q8_pack_panels; 2x Q4's bytes, ~1.18x Q8_0's), and a call
// given them reads its groups' panels where they lie.  The panel path then does the same
// arithmetic on the same panel bytes: the same bits.  (The 1-4 row GEMV below reads the blocks.)
//
// Work split: x is quantized once per call, rows shared among the threads; then the threads take
// contiguous ranges of column groups, as quantized_linear.cpp does, so weights are read once.
// 1-4 rows of x skip the panel: gemv() reads 8 weight rows' blocks where they lie and sums each
// row's integer products across lanes, giving the panel's per-column sums (exact integers), then
// the same fp32 steps: the same bits as the panel path.
//
// VNNI: the tiles (quantized_linear_q8_tiles.h) are compiled twice, once plain and once under
// `#pragma GCC target` for AVX-VNNI / AVX512-VNNI; the caller says which to run (the wrapper asks
// the capability probe), and a CPU without VNNI is refused here rather than faulting.

#include "simd.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "quantized_linear_q8.h"
#include "thread_share.h"

#if defined(ENGINE_CPU_ISA)

namespace engine_cpu {
namespace {

constexpr int kBlock = 32;
constexpr int kSteps = kBlock / 4;  // 4 bytes a lane a step
constexpr int kCols = kLanes;       // output columns a group: one fp32 lane each
constexpr int kStepBytes = kCols * 4;
constexpr int kPanelBlockBytes = kSteps * kStepBytes;
constexpr int kMaxTileRows = kLanes == 16 ? 8 : 4;
// Below this many (row, column, block) products one thread is faster than waking the second.
constexpr int64_t kParallelWork = 4096;

enum Format : int { kQ4_0 = 0, kQ4_1 = 1, kQ8_0 = 2 };

// ---- integer vectors: Ints is kCols 32-bit lanes ----

#if defined(ENGINE_CPU_AVX512)
using Ints = __m512i;
inline Ints zero_ints() { return _mm512_setzero_si512(); }
inline Ints load_ints(const void* p) { return _mm512_loadu_si512(p); }
inline Ints broadcast_ints(int32_t v) { return _mm512_set1_epi32(v); }
inline Ints add16(Ints a, Ints b) { return _mm512_add_epi16(a, b); }
inline Ints add32(Ints a, Ints b) { return _mm512_add_epi32(a, b); }
inline Ints sub32(Ints a, Ints b) { return _mm512_sub_epi32(a, b); }
inline Ints maddubs(Ints u8, Ints s8) { return _mm512_maddubs_epi16(u8, s8); }
inline Ints widen_pairs(Ints i16) { return _mm512_madd_epi16(i16, _mm512_set1_epi16(1)); }
inline Vec to_float(Ints v) { return _mm512_cvtepi32_ps(v); }
inline Ints abs8(Ints v) { return _mm512_abs_epi8(v); }
// s8 with the signs of w (AVX-512 has no vpsignb; where w is 0, |w| is 0 and the sign is moot).
struct Signs {
  __mmask64 negative;
};
inline Signs signs_of(Ints w) { return Signs{_mm512_movepi8_mask(w)}; }
inline Ints with_signs(Ints x, Signs s) { return _mm512_mask_sub_epi8(x, s.negative, _mm512_setzero_si512(), x); }
inline Vec load_floats(const float* p) { return _mm512_loadu_ps(p); }
inline Vec min(Vec a, Vec b) { return _mm512_min_ps(a, b); }
inline Bits round_to_int(Vec v) { return _mm512_cvtps_epi32(v); }  // to nearest even (MXCSR's default)
#else
using Ints = __m256i;
inline Ints zero_ints() { return _mm256_setzero_si256(); }
inline Ints load_ints(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
inline Ints broadcast_ints(int32_t v) { return _mm256_set1_epi32(v); }
inline Ints add16(Ints a, Ints b) { return _mm256_add_epi16(a, b); }
inline Ints add32(Ints a, Ints b) { return _mm256_add_epi32(a, b); }
inline Ints sub32(Ints a, Ints b) { return _mm256_sub_epi32(a, b); }
inline Ints maddubs(Ints u8, Ints s8) { return _mm256_maddubs_epi16(u8, s8); }
inline Ints widen_pairs(Ints i16) { return _mm256_madd_epi16(i16, _mm256_set1_epi16(1)); }
inline Vec to_float(Ints v) { return _mm256_cvtepi32_ps(v); }
inline Ints abs8(Ints v) { return _mm256_abs_epi8(v); }
struct Signs {
  Ints w;
};
inline Signs signs_of(Ints w) { return Signs{w}; }
inline Ints with_signs(Ints x, Signs s) { return _mm256_sign_epi8(x, s.w); }
inline Vec load_floats(const float* p) { return _mm256_loadu_ps(p); }
inline Vec min(Vec a, Vec b) { return _mm256_min_ps(a, b); }
inline Bits round_to_int(Vec v) { return _mm256_cvtps_epi32(v); }
#endif

// v, as the instruction before left it: an empty asm that the compiler cannot see through.
// PERF: without it GCC reassociates a tile's int16 sums (integer adds may be), computes all 32
// maddubs of a block before adding any, and spills them to the stack: 2x slower.
inline Ints in_register(Ints v) {
  asm("" : "+x"(v));
  return v;
}

inline int32_t load_i32(const void* p) {
  int32_t value;
  std::memcpy(&value, p, sizeof value);
  return value;
}

inline float fp16_to_float(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, sizeof bits);
  return _cvtsh_ss(bits);
}

// ---- x as Q8 blocks ----

// x's rows as Q8 blocks.  A product may read a range of each row's blocks (blocks_from): k_blocks
// is the rows' stride in blocks, and the problem says how many of them it reads.
struct QuantizedRows {
  int8_t* q;      // [m, k] row-major
  float* scale;   // [m, k_blocks]: d
  float* sum;     // [m, k_blocks]: s = d * asum
  int32_t* asum;  // [m, k_blocks]
  int64_t k_blocks;
  uint8_t* q_offset;  // [m, k]: q + 128, for Q8_0 weights with VNNI (Panel), or null
};

// Blocks block0 on of every row (a quantized block depends on its own 32 values alone, so this is
// what quantizing x's columns from 32 block0 on would give).
QuantizedRows blocks_from(const QuantizedRows& x, int64_t block0) {
  return QuantizedRows{x.q + block0 * kBlock, x.scale + block0,  x.sum + block0,
                       x.asum + block0,        x.k_blocks,        x.q_offset ? x.q_offset + block0 * kBlock : nullptr};
}

inline float max_lane(Vec v) {
#if defined(ENGINE_CPU_AVX512)
  return _mm512_reduce_max_ps(v);  // max does not depend on the order
#else
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
#endif
}

// One block of 32 values at x -> 32 int8 at q; returns asum, sets *scale.
template <typename T>
inline int32_t quantize_block(const T* x, DType dtype, int8_t* q, float* scale) {
  constexpr int kChunks = kBlock / kLanes;
  Vec v[kChunks];
  Vec amax = splat(0.0f);
  for (int c = 0; c < kChunks; c++) {
    v[c] = load(x + c * kLanes, dtype);
    amax = max(amax, abs(v[c]));
  }
  const float d = max_lane(amax) / 127.0f;
  const Vec id = splat(d != 0.0f ? 1.0f / d : 0.0f);
  Bits qi[kChunks];
  for (int c = 0; c < kChunks; c++) {
    const Vec scaled = v[c] * id;
    qi[c] = round_to_int(min(max(scaled, splat(-127.0f)), splat(127.0f)));
  }
  *scale = d;
#if defined(ENGINE_CPU_AVX512)
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm512_cvtepi32_epi8(qi[0]));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16), _mm512_cvtepi32_epi8(qi[1]));
  return _mm512_reduce_add_epi32(_mm512_add_epi32(qi[0], qi[1]));
#else
  const __m256i words = _mm256_packs_epi16(_mm256_packs_epi32(qi[0], qi[1]), _mm256_packs_epi32(qi[2], qi[3]));
  // packs works within 128-bit halves: dwords (0 4 1 5 2 6 3 7) hold x's bytes 0-3, 4-7, ...
  const __m256i bytes = _mm256_permutevar8x32_epi32(words, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), bytes);
  __m256i total = _mm256_add_epi32(_mm256_add_epi32(qi[0], qi[1]), _mm256_add_epi32(qi[2], qi[3]));
  __m128i sum = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
  sum = _mm_add_epi32(sum, _mm_shuffle_epi32(sum, 0x4e));
  sum = _mm_add_epi32(sum, _mm_shuffle_epi32(sum, 0xb1));
  return _mm_cvtsi128_si32(sum);
#endif
}

template <typename T>
void quantize_rows(const T* x, int64_t x_stride, DType dtype, int64_t begin, int64_t end, const QuantizedRows& out) {
  for (int64_t i = begin; i < end; i++) {
    for (int64_t b = 0; b < out.k_blocks; b++) {
      const int64_t at = i * out.k_blocks + b;
      const int32_t asum = quantize_block(x + i * x_stride + b * kBlock, dtype, out.q + at * kBlock, &out.scale[at]);
      out.asum[at] = asum;
      out.sum[at] = out.scale[at] * float(asum);
    }
    if (out.q_offset != nullptr) {  // q ^ 0x80 is q + 128 for int8 q
      const int64_t k = out.k_blocks * kBlock;
      for (int64_t j = 0; j < k; j++) out.q_offset[i * k + j] = uint8_t(out.q[i * k + j]) ^ 0x80;
    }
  }
}

// ---- the panel: kCols weight rows, lanes = columns ----

struct Panel {
  uint8_t* bytes;  // [k_blocks][kSteps][kCols][4]
  float* scale;    // [k_blocks][kCols]: dw
  float* min;      // [k_blocks][kCols]: mw (Q4_1), or Q8_0's weight sums (offset_sums)
};

// Q8_0 with VNNI multiplies x + 128 (unsigned) by w (signed) rather than |w| by x with w's signs:
// two instructions a row a step where the signs take three, plus two a step.  The integer sum
// is then sum (x + 128) w = sum x w + 128 sum w, exact in int32, so the panel keeps 128 sum w a
// column a block (int32, in `min`'s place) and the tile subtracts it: the same isum, the same bits.
// PERF: the Q8_0 LM head (49152x576) at 16-64 rows 1.65-1.69x faster on a 2-vCPU AMD EPYC.
inline const int32_t* offset_sums(const Panel& panel) { return reinterpret_cast<const int32_t*>(panel.min); }

// Packed panels of a weight of k_blocks blocks a row: group g (rows kCols g ..) is its panel's
// bytes, then its scales, then (Q4_1) its minimums or (Q8_0) its offset sums, group_bytes apart.
constexpr int64_t group_bytes(int format, int64_t k_blocks) {
  return k_blocks * (kPanelBlockBytes + int64_t(kCols) * 4 * (format == kQ4_0 ? 1 : 2));
}

// Group `group`'s panel in packed panels, from block `block0` on.
inline Panel packed_panel(const Q8Panels& packed, int format, int64_t group, int64_t block0) {
  uint8_t* base = const_cast<uint8_t*>(packed.packed) + group * group_bytes(format, packed.k_blocks);
  float* scale = reinterpret_cast<float*>(base + packed.k_blocks * kPanelBlockBytes);
  return Panel{base + block0 * kPanelBlockBytes, scale + block0 * kCols, scale + (packed.k_blocks + block0) * kCols};
}

// The next group's packed panel, fetched into L2 a few lines at a time while this group's tiles
// run.  PERF: a group's panel otherwise comes from memory during its first tile, and those reads
// add to the products rather than overlap them: a 3072x576 Q4_1 weight's panels (2.2 MB) cost
// ~87 us on top of its 204 us of products at 32 rows on a 2-vCPU AMD EPYC (36 us at 5 rows), as
// much as 14 rows' products.  That is also why a narrow level segment read for a few rows costs
// nearly what it costs for all of them.  With the prefetch, the model's Q4_1 projections take
// 0.74-0.90x the time at 8-64 rows there (benchmarks/quantized_linear.py --baseline-library;
// neutral on the AVX2 build, whose products are slower than the reads).  Below kPrefetchRows a
// group's products are too short to cover the next group's reads, and 5 rows measured 1.2x
// slower with it.  Prefetching never changes a result.
constexpr int64_t kPrefetchRows = 8;
class PanelPrefetch {
 public:
  PanelPrefetch() = default;
  // Group `group`'s panel bytes, scales and minimums or offset sums, for k_blocks blocks from the
  // view's block0, spread over `steps` calls of step().
  PanelPrefetch(const Q8Panels& packed, int format, int64_t group, int64_t k_blocks, int64_t steps) {
    const Panel next = packed_panel(packed, format, group, packed.block0);
    add(next.bytes, k_blocks * kPanelBlockBytes);
    add(next.scale, k_blocks * kCols * 4);
    if (format != kQ4_0) add(next.min, k_blocks * kCols * 4);
    int64_t lines = 0;
    for (int i = 0; i < count_; i++) lines += (end_[i] - at_[i] + kLine - 1) / kLine;
    per_step_ = steps > 0 ? (lines + steps - 1) / steps : lines;
  }
  void step() {
    for (int64_t n = 0; n < per_step_ && range_ < count_; n++) {
      _mm_prefetch(at_[range_], _MM_HINT_T1);
      at_[range_] += kLine;
      if (at_[range_] >= end_[range_]) range_++;
    }
  }

 private:
  static constexpr int64_t kLine = 64;
  void add(const void* start, int64_t bytes) {
    at_[count_] = static_cast<const char*>(start);
    end_[count_] = at_[count_] + bytes;
    count_++;
  }
  const char* at_[3] = {};
  const char* end_[3] = {};
  int count_ = 0, range_ = 0;
  int64_t per_step_ = 0;
};

// A block's 32 weights as bytes in order: Q4 as 0..15, Q8_0 as int8.
template <int F>
inline __m256i block_bytes(const uint8_t* block) {
  if (F == kQ8_0) return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 2));
  const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(block + (F == kQ4_1 ? 4 : 2)));
  const __m128i nibble = _mm_set1_epi8(0x0f);
  // weight j < 16 is the low nibble of byte j, weight 16 + j its high nibble
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(packed, 4), nibble), _mm_and_si128(packed, nibble));
}

// rows[c] (8 of them): 8 dwords each -> out[t] holds dword t of every row (an 8 x 8 transpose).
inline void transpose8(__m256i (&r)[8]) {
  __m256i a[8], b[8];
  for (int j = 0; j < 4; j++) {
    a[2 * j] = _mm256_unpacklo_epi32(r[2 * j], r[2 * j + 1]);
    a[2 * j + 1] = _mm256_unpackhi_epi32(r[2 * j], r[2 * j + 1]);
  }
  for (int j = 0; j < 2; j++)
    for (int h = 0; h < 2; h++) {
      b[4 * j + h] = _mm256_unpacklo_epi64(a[4 * j + h], a[4 * j + 2 + h]);
      b[4 * j + 2 + h] = _mm256_unpackhi_epi64(a[4 * j + h], a[4 * j + 2 + h]);
    }
  // b[0] = dwords 0 of rows 0-3 | dwords 4 of rows 0-3, b[2] = dwords 1, b[1] = dwords 2, b[3] = 3
  const int order[4] = {0, 2, 1, 3};
  for (int t = 0; t < 4; t++) {
    r[t] = _mm256_permute2x128_si256(b[order[t]], b[4 + order[t]], 0x20);
    r[t + 4] = _mm256_permute2x128_si256(b[order[t]], b[4 + order[t]], 0x31);
  }
}

template <int F>
constexpr int64_t block_size_bytes() {
  return F == kQ4_0 ? 18 : F == kQ4_1 ? 20 : 34;
}

// Rows c0 .. c0 + kCols - 1 of the weight into the panel (rows past the last repeat it).
template <int F>
void fill_panel(const uint8_t* weight, int64_t weight_stride, int64_t n, int64_t c0, int64_t k_blocks,
                const Panel& panel) {
  const uint8_t* rows[kCols];
  for (int c = 0; c < kCols; c++) rows[c] = weight + std::min<int64_t>(c0 + c, n - 1) * weight_stride;
  for (int64_t b = 0; b < k_blocks; b++) {
    const int64_t at = b * block_size_bytes<F>();
    for (int half = 0; half < kCols / 8; half++) {
      __m256i r[8];
      for (int c = 0; c < 8; c++) r[c] = block_bytes<F>(rows[8 * half + c] + at);
      transpose8(r);
      uint8_t* steps = panel.bytes + b * kPanelBlockBytes + half * 32;
      for (int t = 0; t < kSteps; t++) _mm256_storeu_si256(reinterpret_cast<__m256i*>(steps + t * kStepBytes), r[t]);
    }
    for (int c = 0; c < kCols; c++) {
      panel.scale[b * kCols + c] = fp16_to_float(rows[c] + at);
      if (F == kQ4_1) panel.min[b * kCols + c] = fp16_to_float(rows[c] + at + 2);
      if (F == kQ8_0) {
        int32_t sum = 0;
        for (int j = 0; j < kBlock; j++) sum += int8_t(rows[c][at + 2 + j]);
        const int32_t offset_sum = 128 * sum;
        std::memcpy(panel.min + b * kCols + c, &offset_sum, sizeof offset_sum);
      }
    }
  }
}

struct Problem {
  const void* x;
  int64_t x_stride;
  const uint8_t* weight;
  int64_t weight_stride;
  const void* bias;
  void* out;
  int64_t out_stride;
  int64_t m, n, k_blocks;
  DType dtype;
  Q8Panels panels;  // packed.packed null, or row0 off the panel width: pack per call
};

template <typename V>
V* grown(std::vector<V>& buffer, int64_t size) {
  if (int64_t(buffer.size()) < size) buffer.resize(size);
  return buffer.data();
}

QuantizedRows quantized_rows_buffer(int64_t m, int64_t k_blocks, bool with_offset) {
  static thread_local std::vector<int8_t> q;
  static thread_local std::vector<uint8_t> q_offset;
  static thread_local std::vector<float> floats;
  static thread_local std::vector<int32_t> sums;
  float* f = grown(floats, 2 * m * k_blocks);
  return QuantizedRows{grown(q, m * k_blocks * kBlock), f, f + m * k_blocks, grown(sums, m * k_blocks), k_blocks,
                       with_offset ? grown(q_offset, m * k_blocks * kBlock) : nullptr};
}

// ---- few rows of x: row-major blocks, no panel ----
//
// At 1-4 rows of x the panel costs more than the dot products it feeds (a transpose of every
// block for one use).  Here a group of 8 weight rows is read where it lies: each row's block is
// expanded to 32 bytes and multiplied with x's block (maddubs, then madd: 8 int32 partial sums),
// and a tree of hadds turns the 8 rows' partial sums into one vector of their 8 block sums.  From
// there each lane is a column of the panel path, with the same fp32 operations in the same order
// (the integer sums are exact in any order), so a row's result is the same bits whichever path
// and batch size computes it.  8 columns in every build (the integer work is 256-bit wide either
// way); the scales of the 8 rows' blocks come in with one gather.

constexpr int kGemvCols = 8;

#if defined(ENGINE_CPU_AVX512)
inline Vec from8(__m256 v) { return _mm512_castps256_ps512(v); }  // lanes 8-15 never stored
inline __m256 to8(Vec v) { return _mm512_castps512_ps256(v); }
#else
inline Vec from8(__m256 v) { return v; }
inline __m256 to8(Vec v) { return v; }
#endif

// 8 int32 lanes, each the sum of 4 byte products of w (u8) and x (s8); nothing saturates.
inline __m256i dot_bytes(__m256i w, __m256i x) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1));
}

// Lane c: the sum of v[c]'s 8 lanes, for 8 vectors (hadds: pairs, then quads, then halves).
inline __m256i sum_lanes8(const __m256i (&v)[8]) {
  const __m256i a0 = _mm256_hadd_epi32(v[0], v[1]), a1 = _mm256_hadd_epi32(v[2], v[3]);
  const __m256i a2 = _mm256_hadd_epi32(v[4], v[5]), a3 = _mm256_hadd_epi32(v[6], v[7]);
  const __m256i low = _mm256_hadd_epi32(a0, a1), high = _mm256_hadd_epi32(a2, a3);  // rows 0-3, rows 4-7
  return _mm256_add_epi32(_mm256_permute2x128_si256(low, high, 0x20), _mm256_permute2x128_si256(low, high, 0x31));
}

// The fp16 scale pair at the start of 8 rows' blocks (offsets from `base`) -> d in *d, and for
// Q4_1 the min in *m.
template <int F>
inline void block_scales(const uint8_t* base, __m256i offsets, __m256* d, __m256* m) {
  const __m256i pairs = _mm256_i32gather_epi32(reinterpret_cast<const int*>(base), offsets, 1);
  // per 128-bit half: low 16 bits of each dword (d), then the high 16 (m)
  const __m256i halves = _mm256_packus_epi32(_mm256_and_si256(pairs, _mm256_set1_epi32(0xffff)),
                                             _mm256_srli_epi32(pairs, 16));
  const __m256i ordered = _mm256_permute4x64_epi64(halves, 0xd8);  // d0-3 d4-7 | m0-3 m4-7
  *d = _mm256_cvtph_ps(_mm256_castsi256_si128(ordered));
  if (F == kQ4_1) *m = _mm256_cvtph_ps(_mm256_extracti128_si256(ordered, 1));
}

// out[m0 + i, c0 .. c0 + 7] for MR rows of x, 8 weight rows read in place.
// `rows`: the group's 8 weight rows (past the matrix's last: the last again); `offsets`: theirs
// from the first's, in bytes.
template <int F, int MR, typename T>
void gemv_group(const Problem& p, const QuantizedRows& x, int64_t c0, const uint8_t* const (&rows)[kGemvCols],
                __m256i offsets) {
  const int64_t prefetch_ahead = 2 * kGemvCols * p.weight_stride;  // the same block two groups on
  __m256 acc[MR];
  for (int i = 0; i < MR; i++) acc[i] = _mm256_setzero_ps();
  for (int64_t b = 0; b < p.k_blocks; b++) {
    const int64_t at_block = b * block_size_bytes<F>();
    __m256i xq[MR];
    for (int i = 0; i < MR; i++)
      xq[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q + (i * x.k_blocks + b) * kBlock));
    __m256i partial[MR][8];
    for (int c = 0; c < kGemvCols; c++) {
      const uint8_t* block = rows[c] + at_block;
      // PERF: 8 rows side by side are 8 short streams, too short for the hardware prefetcher.
      __builtin_prefetch(block + prefetch_ahead);
      __m256i w = block_bytes<F>(block);
      if (F == kQ8_0) {
        for (int i = 0; i < MR; i++) partial[i][c] = dot_bytes(_mm256_abs_epi8(w), _mm256_sign_epi8(xq[i], w));
      } else {
        for (int i = 0; i < MR; i++) partial[i][c] = dot_bytes(w, xq[i]);
      }
    }
    __m256 dw, mw;
    block_scales<F>(rows[0] + at_block, offsets, &dw, &mw);
    for (int i = 0; i < MR; i++) {
      const int64_t at = i * x.k_blocks + b;
      __m256i isum = sum_lanes8(partial[i]);
      if (F == kQ4_0) isum = _mm256_sub_epi32(isum, _mm256_set1_epi32(8 * x.asum[at]));
      acc[i] = _mm256_fmadd_ps(_mm256_mul_ps(dw, _mm256_set1_ps(x.scale[at])), _mm256_cvtepi32_ps(isum), acc[i]);
      if (F == kQ4_1) acc[i] = _mm256_fmadd_ps(mw, _mm256_set1_ps(x.sum[at]), acc[i]);
    }
  }
  const Mask live = lanes(std::min<int64_t>(kGemvCols, p.n - c0));
  const Vec bias = p.bias ? load(static_cast<const T*>(p.bias) + c0, p.dtype, live) : splat(0.0f);
  for (int i = 0; i < MR; i++)
    store(static_cast<T*>(p.out) + i * p.out_stride + c0, from8(acc[i]) + bias, p.dtype, live);
}

// All of out for a few rows of x (1-4): the threads share the groups of 8 columns.
template <int F, int MR, typename T>
void gemv(const Problem& p, const QuantizedRows& x) {
  int64_t begin, end;
  thread_share((p.n + kGemvCols - 1) / kGemvCols, &begin, &end);
  for (int64_t group = begin; group < end; group++) {
    const int64_t c0 = group * kGemvCols;
    const uint8_t* rows[kGemvCols];
    alignas(32) int32_t offsets[kGemvCols];
    for (int c = 0; c < kGemvCols; c++) {
      const int64_t row = std::min<int64_t>(c0 + c, p.n - 1);  // a last partial group repeats its last row
      rows[c] = p.weight + row * p.weight_stride;
      offsets[c] = int32_t((row - c0) * p.weight_stride);
    }
    gemv_group<F, MR, T>(p, x, c0, rows, _mm256_load_si256(reinterpret_cast<const __m256i*>(offsets)));
  }
}

namespace plain {
#define ENGINE_Q8_VNNI 0
#include "quantized_linear_q8_tiles.h"
#undef ENGINE_Q8_VNNI
}  // namespace plain

#pragma GCC push_options
#if defined(ENGINE_CPU_AVX512)
#pragma GCC target("avx512vnni")
#else
#pragma GCC target("avxvnni")
#endif
namespace vnni {
#define ENGINE_Q8_VNNI 1
#include "quantized_linear_q8_tiles.h"
#undef ENGINE_Q8_VNNI
}  // namespace vnni
#pragma GCC pop_options

bool cpu_has_vnni() {
#if defined(ENGINE_CPU_AVX512)
  return __builtin_cpu_supports("avx512vnni");
#else
  return __builtin_cpu_supports("avxvnni");
#endif
}

}  // namespace
}  // namespace engine_cpu

#endif  // ENGINE_CPU_ISA

extern "C" {

// out[i, j] = the Q8-activation product of x's row i with weight row j (+ bias[j]), as the file's
// header says, for i < m, j < n.  x [m, >= 32 k_blocks] rows x_stride elements apart; weight: n
// rows of k_blocks blocks of `format` (0 Q4_0, 1 Q4_1, 2 Q8_0), rows weight_stride bytes apart;
// bias [n] or null; out rows out_stride elements apart; x, bias and out share `dtype`.  vnni: 1
// to use AVX-VNNI (AVX2 build) or AVX512-VNNI (AVX-512 build).  Returns 0, or -1 for a format,
// dtype, count or variant this build or CPU does not handle.
// packed: the weight's packed panels (quantized_linear_q8_pack_panels) or null; this weight is
// then rows packed_row0 .. and blocks packed_block0 .. of the packed one (packed_k_blocks a row).
int quantized_linear_q8(const void* x, int64_t x_stride, const uint8_t* weight, int64_t weight_stride,
                        const void* bias, void* out, int64_t out_stride, int64_t m, int64_t n, int64_t k_blocks,
                        int format, int dtype, int vnni, int num_threads, const uint8_t* packed,
                        int64_t packed_k_blocks, int64_t packed_row0, int64_t packed_block0) {
#if defined(ENGINE_CPU_ISA)
  using namespace engine_cpu;
  if (m < 0 || n < 0 || k_blocks < 0 || format < kQ4_0 || format > kQ8_0) return -1;
  if (packed != nullptr && (packed_row0 < 0 || packed_block0 < 0 || packed_block0 + k_blocks > packed_k_blocks))
    return -1;
  if (vnni && !cpu_has_vnni()) return -1;
  if (m == 0 || n == 0) return dtype >= kFloat32 && dtype <= kFloat16 ? 0 : -1;
  // One product: the tiles entry with a single tile (x quantized, then this thread's share).
  const Q8Tile tile{weight, weight_stride, bias, out, out_stride, m, n, 0, k_blocks,
                    Q8Panels{packed, packed_k_blocks, packed_row0, packed_block0}};
  return quantized_linear_q8_tiles(x, x_stride, m, k_blocks, &tile, 1, format, dtype, vnni, num_threads);
#else
  return -1;
#endif
}

// Several products of one x in one parallel region (quantized_linear_q8.h, Q8Tile): x [m, >= 32
// k_blocks] is quantized once, then the threads share each tile's columns in turn, with no
// barrier between tiles (their outputs must not overlap).  Each tile gives the bits
// quantized_linear_q8 gives for it alone.  Why: a step whose rows run at several elastic levels
// multiplies up to six segments of a weight (decode_layer.cpp's column tiles); one call each
// paid the threads' wake-up and x's quantization six times.
int quantized_linear_q8_tiles(const void* x, int64_t x_stride, int64_t m, int64_t k_blocks, const Q8Tile* tiles,
                              int64_t count, int format, int dtype, int vnni, int num_threads) {
#if defined(ENGINE_CPU_ISA)
  using namespace engine_cpu;
  if (m < 0 || k_blocks < 0 || count < 0 || format < kQ4_0 || format > kQ8_0) return -1;
  if (vnni && !cpu_has_vnni()) return -1;
  for (int64_t i = 0; i < count; i++) {
    const Q8Tile& t = tiles[i];
    if (t.m < 0 || t.m > m || t.n < 0 || t.block0 < 0 || t.k_blocks < 0 || t.block0 + t.k_blocks > k_blocks) return -1;
    if (t.panels.packed != nullptr && (t.panels.row0 < 0 || t.panels.block0 < 0 ||
                                       t.panels.block0 + t.k_blocks > t.panels.k_blocks))
      return -1;
  }
  if (m == 0 || count == 0) return dtype >= kFloat32 && dtype <= kFloat16 ? 0 : -1;
  return with_storage_type(dtype, [&](auto element, DType type) {
    using T = decltype(element);
    if (vnni) {
      vnni::run_tiles<T>(x, x_stride, m, k_blocks, tiles, count, format, type, num_threads);
    } else {
      plain::run_tiles<T>(x, x_stride, m, k_blocks, tiles, count, format, type, num_threads);
    }
  });
#else
  return -1;
#endif
}

// Bytes of a weight's packed panels: n rows of k_blocks blocks of `format` (-1 for a bad format).
int64_t quantized_linear_q8_packed_bytes(int64_t n, int64_t k_blocks, int format) {
#if defined(ENGINE_CPU_ISA)
  using namespace engine_cpu;
  if (n < 0 || k_blocks < 0 || format < kQ4_0 || format > kQ8_0) return -1;
  return (n + kCols - 1) / kCols * group_bytes(format, k_blocks);
#else
  return -1;
#endif
}

// Packs a weight (n rows of k_blocks blocks, rows weight_stride bytes apart) into `packed`
// (quantized_linear_q8_packed_bytes of them): every group's panel, as a call would make it.
int quantized_linear_q8_pack_panels(const uint8_t* weight, int64_t weight_stride, int64_t n, int64_t k_blocks,
                                    int format, uint8_t* packed, int num_threads) {
#if defined(ENGINE_CPU_ISA)
  using namespace engine_cpu;
  if (n <= 0 || k_blocks < 0 || format < kQ4_0 || format > kQ8_0 || packed == nullptr) return -1;
  const int64_t groups = (n + kCols - 1) / kCols;
  const Q8Panels whole{packed, k_blocks, 0, 0};
#pragma omp parallel for num_threads(num_threads)
  for (int64_t group = 0; group < groups; group++) {
    const Panel panel = packed_panel(whole, format, group, 0);
    switch (format) {
      case kQ4_0: fill_panel<kQ4_0>(weight, weight_stride, n, group * kCols, k_blocks, panel); break;
      case kQ4_1: fill_panel<kQ4_1>(weight, weight_stride, n, group * kCols, k_blocks, panel); break;
      case kQ8_0: fill_panel<kQ8_0>(weight, weight_stride, n, group * kCols, k_blocks, panel); break;
    }
  }
  return 0;
#else
  return -1;
#endif
}

// Whether this build and CPU can run the VNNI variant: 1 or 0.
int quantized_linear_q8_has_vnni(void) {
#if defined(ENGINE_CPU_ISA)
  return engine_cpu::cpu_has_vnni() ? 1 : 0;
#else
  return 0;
#endif
}

}  // extern "C"
