// One decoder layer of a decode step in one call: the same kernels the layers call one by one
// (rms_norm, quantized_linear or quantized_linear_q8, rotary_embedding, paged_decode_attention,
// silu_and_mul), in the same order on the same data, with the K/V write between them.
//
// Why: a single decode stream runs ~12 kernels a layer, each a few microseconds of Python
// (a layer object, argument checks, a tensor allocation, a ctypes call) around its work: ~2.6 ms
// of a ~9.5 ms step on SmolLM2's 30 layers (benchmarks/README.md, "A row-major Q8 GEMV").  Here a
// layer is one ctypes call, and a run of consecutive layers one call too (decode_layers); what
// each kernel computes is unchanged, so the result is the same bits as the layer-by-layer path
// (tests/model/test_fused_decode.py holds it to that).
//
// What it covers: every row a decode (one token each) or a prefill chunk's token given as a row of
// its own (its sequence's block-table row, its own context length: the caller expands them; every
// row's K/V is written before any row attends, so a chunk's tokens attend causally within it);
// every linear as quantized blocks (a prefix view, a bias and permuted inputs allowed: an elastic
// model's full level); attention through the paged decode kernel (grouped or rank-major heads).
// engine/model/layers/fused_decode.py decides when a layer qualifies; anything else runs layer by
// layer.
//
// Elastic levels (engine/model/layers/elastic.py has the picture): a step's rows carry level
// indices; an elastic block then runs the column tiles of its weights in level order, each
// weight segment once for every row that keeps it, exactly as the layer-by-layer tile path does
// (same kernels, same order, same per-tile rounding), and adds each level's side path with the
// kernel the tile path calls too (elastic_side_path): the same bits again.
//
//     h = norm(x [+ residual])            residual <- x + residual (or x itself, the first layer)
//     qkv = h Wqkv^T;  RoPE on Q and K;   K, V -> their cache slots (as int8 rows where the
//                                          cache is int8: the rows torch's write_kv_cache writes)
//     a = attention(Q, cache) Wo^T
//     h = norm(a + residual)              residual <- a + residual
//     out = (silu(h Wg^T) * (h Wu^T)) Wd^T

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "quantized_linear_q8.h"
#include "simd.h"
#include "thread_share.h"

#if defined(ENGINE_CPU_ISA)

extern "C" {
int rms_norm(const void* x, int64_t x_stride, void* residual, const void* weight, void* out, int64_t rows,
             int64_t hidden, float eps, int dtype, int num_threads);
int rotary_embedding(void* x, int64_t tokens, int64_t heads, int64_t head_dim, int64_t token_stride, const void* cos,
                     const void* sin, int dtype, int num_threads);
int silu_and_mul(const void* x, int64_t x_stride, void* out, int64_t out_stride, int64_t tokens, int64_t n, int dtype,
                 int num_threads);
int paged_decode_attention(const void* query, int64_t query_stride, const void* key_cache, const void* value_cache,
                           const int32_t* block_tables, int64_t block_table_stride, const int32_t* seq_lens,
                           const int32_t* group_heads, void* out, int num_seqs, int num_q_heads, int num_kv_heads,
                           int head_dim, int block_size, float scale, int dtype, int num_threads, int rank_major,
                           int kv_int8);
int quantized_linear(const void* x, int64_t x_stride, const uint8_t* weight, int64_t weight_stride, const void* bias,
                     void* out, int64_t out_stride, int64_t m, int64_t n, int64_t k_blocks, int format, int dtype,
                     int num_threads);
}

namespace {

constexpr int64_t kBlock = 32;

// One quantized linear, as engine/kernels/cpu/quantized_weights.py's QuantizedWeight has it.
struct LinearDesc {
  const uint8_t* blocks;
  int64_t row_stride;          // bytes between weight rows
  const void* bias;            // [out_features] in the activations' dtype, or null
  const int64_t* input_order;  // inputs in stored order: x[:, input_order] (null: as they come)
  int64_t out_features, in_features;
  int32_t format;
  Q8Panels panels;  // its packed panels (quantized_linear_q8.h), or packed null
};

// One elastic level of one block (attention or FFN): the columns it keeps (query-head slots x
// head_dim, or FFN neurons: a prefix) and its recovery side path, out += bias + B (A h), h the
// block's normed input.  Level index 0 is the full block (no side path).
struct LevelDesc {
  int64_t width;
  const float* lora_a;       // [rank, hidden] fp32, or null
  const float* lora_b_rows;  // [rank, hidden] fp32: B transposed, so its columns are rows
  const void* bias;     // [hidden] in the activations' dtype, or null
  int64_t rank;
};

// What stays the same from step to step (ctypes.Structure in fused_decode.py: keep in sync).
struct LayerDesc {
  LinearDesc qkv, o, gate_up, down;
  const LevelDesc* attention_levels;  // [num_levels] per level index, or null: the block is whole
  const LevelDesc* ffn_levels;
  int64_t num_levels;
  const void* attention_norm;  // [hidden] in the activations' dtype
  const void* ffn_norm;
  float eps, scale;  // RMSNorm epsilon, attention scale
  int32_t hidden, num_q_heads, num_kv_heads, head_dim, intermediate, block_size, rank_major;
};

// This step's (ctypes.Structure likewise).
struct StepDesc {
  int64_t rows;                 // rows, one token each (a decode, or one token of a prefill chunk)
  const void* cos;              // [rows, head_dim / 2] in the activations' dtype
  const void* sin;
  const int64_t* slot_mapping;  // [rows]
  const int32_t* block_tables;  // [rows, block_table_stride]: each row's sequence's
  int64_t block_table_stride;
  const int32_t* seq_lens;      // [rows]: the keys each row attends to (its position + 1)
  void* key_cache;              // [slots, num_kv_heads, head_dim] (+ 4 bytes a row with kv_int8)
  void* value_cache;
  // Elastic rows, or null where every row runs the full model: rows_upto[k] rows are at level
  // index <= k (the arrays above are then in level order), and level-order row i is the
  // caller's row order[i] (null: the caller's rows are in level order already).
  const int64_t* rows_upto;     // [num_levels of the layer]
  const int64_t* order;         // [rows]
  int64_t q8_above_rows;        // a kernel call of more rows runs Q8 activations (-1: never)
  int32_t dtype, vnni, num_threads;
  int32_t kv_int8;              // the cache holds int8 rows and their scales (kv_cache_format.py)
};

int64_t element_size(int dtype) { return dtype == 0 ? 4 : 2; }

// A per-thread byte buffer of at least `bytes`; slot s of a few.
char* scratch(int slot, int64_t bytes) {
  static thread_local std::vector<char> buffers[8];
  if (int64_t(buffers[slot].size()) < bytes) buffers[slot].resize(bytes);
  return buffers[slot].data();
}

int64_t block_bytes(int32_t format) { return format == 0 ? 18 : format == 1 ? 20 : 34; }

// x [m, k_blocks * 32] (rows x_stride elements apart) @ the weight's rows [row0, row0 + n), from
// input block `block0` on -> out [m, n] (rows out_stride apart), plus their bias (if any): a row
// or column range of a quantized weight is a view, as QuantizedWeight.rows / .columns give.
int run_kernel(const LinearDesc& w, const StepDesc& s, int64_t m, const char* x, int64_t x_stride, int64_t row0,
               int64_t n, int64_t block0, int64_t k_blocks, char* out, int64_t out_stride, bool with_bias) {
  const uint8_t* blocks = w.blocks + row0 * w.row_stride + block0 * block_bytes(w.format);
  const void* bias = with_bias && w.bias != nullptr ? static_cast<const char*>(w.bias) + row0 * element_size(s.dtype)
                                                    : nullptr;
  // Per call, as Linear picks its kernel by the rows it is given (a tile's, for a level).
  if (s.q8_above_rows >= 0 && m > s.q8_above_rows)
    return quantized_linear_q8(x, x_stride, blocks, w.row_stride, bias, out, out_stride, m, n, k_blocks, w.format,
                               s.dtype, s.vnni, s.num_threads, w.panels.packed, w.panels.k_blocks,
                               w.panels.row0 + row0, w.panels.block0 + block0);
  return quantized_linear(x, x_stride, blocks, w.row_stride, bias, out, out_stride, m, n, k_blocks, w.format, s.dtype,
                          s.num_threads);
}

// x [rows, in] (rows x_stride elements apart) -> out [rows, out_features] (contiguous).
int linear(const LinearDesc& w, const StepDesc& s, const char* x, int64_t x_stride, char* out) {
  const int64_t size = element_size(s.dtype);
  if (w.input_order != nullptr) {  // gather the inputs into the blocks' order
    char* gathered = scratch(3, s.rows * w.in_features * size);
    for (int64_t r = 0; r < s.rows; r++)
      for (int64_t j = 0; j < w.in_features; j++)
        std::memcpy(gathered + (r * w.in_features + j) * size, x + (r * x_stride + w.input_order[j]) * size, size);
    x = gathered;
    x_stride = w.in_features;
  }
  return run_kernel(w, s, s.rows, x, x_stride, 0, w.out_features, 0, w.in_features / kBlock, out, w.out_features,
                    true);
}

// --- elastic levels ----------------------------------------------------------------------------

// A weight range every level-order row [0, rows) uses (engine/model/layers/elastic.py,
// column_tiles): output rows [start, end) of gate/up and Q, input columns of o_proj and down.
struct Tile {
  int64_t rows, start, end;
};

std::vector<Tile> column_tiles(const LevelDesc* levels, const int64_t* rows_upto, int64_t num_levels) {
  std::vector<Tile> tiles;

  for (int64_t index = 0; index < num_levels; index++) {
    const int64_t width = levels[index].width, rows = rows_upto[index];
    const int64_t start = index + 1 < num_levels ? levels[index + 1].width : 0;
    if (rows == 0 || start >= width) continue;
    if (!tiles.empty() && tiles.back().rows == rows && tiles.back().start == width)
      tiles.back().start = start;  // same rows, adjacent columns: one call
    else
      tiles.push_back({rows, start, width});
  }
  return tiles;
}

// out[i] += add[i] for `count` elements of the activations' dtype, each sum rounded once (torch's +=).
void add_into(char* out, const char* add, int64_t count, int dtype) {
  using namespace engine_cpu;
  with_storage_type(dtype, [&](auto element, DType type) {
    using T = decltype(element);
    T* o = reinterpret_cast<T*>(out);
    const T* a = reinterpret_cast<const T*>(add);
    for (int64_t i = 0; i < count; i += kLanes) {
      const auto live = lanes(count - i);
      store(o + i, load(o + i, type, live) + load(a + i, type, live), type, live);
    }
  });
}

// One product of a linear's weight: rows [0, m) of x from input block block0 on (k_blocks of
// them) times weight rows [row0, row0 + n) -> out (+ their bias).
struct Product {
  int64_t m, row0, n, block0, k_blocks;
  char* out;
  int64_t out_stride;
  bool with_bias;
};

// Products of one x in as few kernel calls as run_kernel's choice allows: those it would give Q8
// activations in one quantized_linear_q8_tiles call (x quantized once, one parallel region), the
// rest one by one.  Each product is the same kernel on the same data as its own run_kernel call,
// so the same bits.  Outputs must not overlap.
int run_products(const LinearDesc& w, const StepDesc& s, const char* x, int64_t x_stride,
                 const std::vector<Product>& products) {
  const int64_t size = element_size(s.dtype);
  std::vector<Q8Tile> bundle;
  int64_t rows = 0, blocks = 0;
  int status = 0;
  for (const Product& p : products) {
    if (p.m == 0 || p.n == 0) continue;
    if (s.q8_above_rows < 0 || p.m <= s.q8_above_rows) {
      status |= run_kernel(w, s, p.m, x + p.block0 * kBlock * size, x_stride, p.row0, p.n, p.block0, p.k_blocks,
                           p.out, p.out_stride, p.with_bias);
      continue;
    }
    const void* bias = p.with_bias && w.bias != nullptr ? static_cast<const char*>(w.bias) + p.row0 * size : nullptr;
    const Q8Panels panels{w.panels.packed, w.panels.k_blocks, w.panels.row0 + p.row0, w.panels.block0 + p.block0};
    bundle.push_back(Q8Tile{w.blocks + p.row0 * w.row_stride + p.block0 * block_bytes(w.format), w.row_stride, bias,
                            p.out, p.out_stride, p.m, p.n, p.block0, p.k_blocks, panels});
    rows = std::max(rows, p.m);
    blocks = std::max(blocks, p.block0 + p.k_blocks);
  }
  if (!bundle.empty())
    status |= quantized_linear_q8_tiles(x, x_stride, rows, blocks, bundle.data(), int64_t(bundle.size()), w.format,
                                        s.dtype, s.vnni, s.num_threads);
  return status;
}

// Gate/up rows or Q rows by tiles: products for out[:tile.rows, row0 + start : row0 + end].
void add_row_tiles(const LinearDesc& w, const StepDesc& s, const std::vector<Tile>& tiles, int64_t row0, char* out,
                   int64_t out_stride, std::vector<Product>* products) {
  const int64_t size = element_size(s.dtype);
  for (const Tile& t : tiles)
    products->push_back(Product{t.rows, row0 + t.start, t.end - t.start, 0, w.in_features / kBlock,
                                out + (row0 + t.start) * size, out_stride, true});
}

// o_proj or down by input-column tiles: out [rows, out_features] = the sum of each tile's product
// over its rows, accumulated in tile order and rounded per tile as the tile path's `out[:n] +=`.
int column_tile_sum(const LinearDesc& w, const StepDesc& s, const std::vector<Tile>& tiles, const char* x,
                    int64_t x_stride, char* out) {
  const int64_t size = element_size(s.dtype), n = w.out_features;
  if (tiles.size() == 1 && tiles[0].start == 0 && tiles[0].rows == s.rows)  // one level: 0 + v is v
    return run_kernel(w, s, s.rows, x, x_stride, 0, n, 0, tiles[0].end / kBlock, out, n, false);
  const int64_t part_bytes = s.rows * n * size;
  char* parts = scratch(6, int64_t(tiles.size()) * part_bytes);
  std::vector<Product> products;
  for (size_t i = 0; i < tiles.size(); i++) {
    const Tile& t = tiles[i];
    products.push_back(Product{t.rows, 0, n, t.start / kBlock, (t.end - t.start) / kBlock, parts + i * part_bytes, n,
                               false});
  }
  const int status = run_products(w, s, x, x_stride, products);
  std::memset(out, 0, s.rows * n * size);
  for (size_t i = 0; i < tiles.size(); i++) add_into(out, parts + i * part_bytes, tiles[i].rows * n, s.dtype);
  return status;
}

// One level's side path on rows [0, rows): out[r] += B (A x[r]) (fp32 products, summed in this
// build's fixed order: kSumLanes partial sums along hidden, then B's columns in rank order), then
// += bias, each add rounded once (SidePath.add_to's two in-place adds).  The layer-by-layer tile
// path calls this too (elastic_side_path below), so both give the same bits.
//
// A x[r] takes A's rows kSideRanks at a time (x's vectors loaded and widened once for all of
// them), and B t[r] takes kSideRows rows at a time (B's vectors loaded once for all of them).
// Each output still sums in the order of one rank and one row at a time, so the bits are the
// same.  PERF (2-vCPU Xeon with AMX, rank 8, hidden 576, bf16, one thread): ~0.4 us a row in the
// avx512_bf16 build and ~0.7 in the avx2 one, against ~0.83 and ~1.64 one rank and one row at a
// time (tests/kernels/test_cpu_elastic_side_path.py checks the bits do not depend on the blocks).
constexpr int kSideRanks = engine_cpu::kSumVecs == 1 ? 8 : 4;  // accumulators: 8 zmm, or 4 x 2 ymm of 16

// t[j] = A[j] . x for j in [0, R): R accumulators (x kSumVecs) in registers.
template <int R, typename T>
void lora_down(const float* a, int64_t hidden, const T* x, engine_cpu::DType dtype, float* t) {
  using namespace engine_cpu;
  Vec partial[R][kSumVecs];
  for (int j = 0; j < R; j++)
    for (int v = 0; v < kSumVecs; v++) partial[j][v] = splat(0.0f);
  for (int64_t i = 0; i < hidden; i += kSumLanes)
    for (int v = 0; v < kSumVecs; v++) {
      const int64_t at = i + v * kLanes;
      if (hidden - at <= 0) continue;
      const auto live = lanes(hidden - at);
      const Vec xv = load(x + at, dtype, live);
      for (int j = 0; j < R; j++) partial[j][v] = fmadd(load(a + j * hidden + at, kFloat32, live), xv, partial[j][v]);
    }
  for (int j = 0; j < R; j++) t[j] = reduce_add(partial[j]);
}

// out[r] += B t_r for R rows at once, B's vectors loaded once for all of them (each row's sum in
// rank order, as one row at a time).
template <int R, typename T>
void lora_up(const float* b_rows, int64_t rank, int64_t hidden, const float* t, T* out, int64_t out_stride,
             engine_cpu::DType dtype) {
  using namespace engine_cpu;
  for (int64_t i = 0; i < hidden; i += kLanes) {
    const auto live = lanes(hidden - i);
    Vec b = load(b_rows + i, kFloat32, live);
    Vec sum[R];
    for (int r = 0; r < R; r++) sum[r] = splat(t[r * rank]) * b;
    for (int64_t k = 1; k < rank; k++) {
      b = load(b_rows + k * hidden + i, kFloat32, live);
      for (int r = 0; r < R; r++) sum[r] = fmadd(splat(t[r * rank + k]), b, sum[r]);
    }
    for (int r = 0; r < R; r++) {
      T* row = out + r * out_stride;
      store(row + i, load(row + i, dtype, live) + sum[r], dtype, live);
    }
  }
}

constexpr int kSideRows = 4;  // rows lora_up takes at once

template <typename T>
void side_path_rows(const LevelDesc& level, int64_t hidden, const T* x, int64_t x_stride, T* out, int64_t out_stride,
                    int64_t rows, engine_cpu::DType dtype) {
  using namespace engine_cpu;
  std::vector<float> t(kSideRows * level.rank);
  for (int64_t r0 = 0; r0 < rows; r0 += kSideRows) {
    const int64_t n = std::min<int64_t>(kSideRows, rows - r0);
    if (level.lora_a != nullptr) {
      for (int64_t r = 0; r < n; r++) {
        const T* in = x + (r0 + r) * x_stride;
        float* tr = t.data() + r * level.rank;
        int64_t j = 0;
        for (; j + kSideRanks <= level.rank; j += kSideRanks)
          lora_down<kSideRanks>(level.lora_a + j * hidden, hidden, in, dtype, tr + j);
        for (; j < level.rank; j++) lora_down<1>(level.lora_a + j * hidden, hidden, in, dtype, tr + j);
      }
      if (n == kSideRows)
        lora_up<kSideRows>(level.lora_b_rows, level.rank, hidden, t.data(), out + r0 * out_stride, out_stride, dtype);
      else
        for (int64_t r = 0; r < n; r++)
          lora_up<1>(level.lora_b_rows, level.rank, hidden, t.data() + r * level.rank, out + (r0 + r) * out_stride,
                     out_stride, dtype);
    }
    if (level.bias != nullptr)
      for (int64_t r = 0; r < n; r++)
        add_into(reinterpret_cast<char*>(out + (r0 + r) * out_stride), static_cast<const char*>(level.bias), hidden,
                 dtype);
  }
}

void side_path(const LevelDesc& level, int64_t hidden, const void* x, int64_t x_stride, void* out, int64_t out_stride,
               int64_t rows, int dtype) {
  engine_cpu::with_storage_type(dtype, [&](auto element, engine_cpu::DType type) {
    using T = decltype(element);
    side_path_rows(level, hidden, static_cast<const T*>(x), x_stride, static_cast<T*>(out), out_stride, rows, type);
  });
}

// Each level's side path on its own level-order rows; h the block's normed input.  The threads
// share the rows that have one (the full level's have none, and they come first in level order:
// shared by all rows, a 16-row step of 8 rows at 100 and 8 at 40 left one thread all the work),
// and a row's arithmetic is the same on any thread, so the same bits.  PERF (2-vCPU Xeon with
// AMX, a 16-row decode step's 48 side paths): 0.82 ms with rows at all six levels, 0.41 ms with 8
// rows at 100 and 8 at 40, against 1.13 and 0.65 before this sharing and lora_down / lora_up.
// Two threads from kParallelSideRows rows on: one thread up to 24 rows (tried) took 0.71 ms where
// two took 0.50 (16 rows at level 40), the LoRA terms coming from memory each step.
constexpr int64_t kParallelSideRows = 4;
inline bool has_side_path(const LevelDesc& level) { return level.lora_a != nullptr || level.bias != nullptr; }
void add_side_paths(const LevelDesc* levels, const StepDesc& s, int64_t num_levels, int64_t hidden, const char* h,
                    char* out) {
  const int64_t size = element_size(s.dtype);
  int64_t with_side_path = 0;  // rows at levels with one
  for (int64_t index = 0; index < num_levels; index++)
    if (has_side_path(levels[index])) with_side_path += s.rows_upto[index] - (index ? s.rows_upto[index - 1] : 0);
  if (with_side_path == 0) return;  // every row at the full level: no parallel region
#pragma omp parallel num_threads(s.num_threads) if (with_side_path >= kParallelSideRows)
  {
    int64_t begin, end;  // this thread's share, counted over the rows with a side path
    thread_share(with_side_path, &begin, &end);
    for (int64_t index = 0, counted = 0; index < num_levels; index++) {
      const int64_t level_first = index ? s.rows_upto[index - 1] : 0, level_rows = s.rows_upto[index] - level_first;
      if (!has_side_path(levels[index])) continue;
      const int64_t first = std::max(begin, counted), last = std::min(end, counted + level_rows);
      if (last > first) {
        const int64_t row = level_first + first - counted;
        side_path(levels[index], hidden, h + row * hidden * size, hidden, out + row * hidden * size, hidden,
                  last - first, s.dtype);
      }
      counted += level_rows;
    }
  }
}

// Per level-order row: the query heads of each KV group its level keeps.
const int32_t* group_heads(const LevelDesc* levels, const StepDesc& s, int64_t num_levels, int64_t kv_width) {
  static thread_local std::vector<int32_t> heads;
  heads.resize(s.rows);
  for (int64_t index = 0, r = 0; index < num_levels; index++)
    for (; r < s.rows_upto[index]; r++) heads[r] = int32_t(levels[index].width / kv_width);
  return heads.data();
}

// One head's K or V row as an int8 cache row: head_dim values q = round(x / s) (halves to even)
// with s = max|x| / 127, then s's four bytes.  The same fp32 operations as
// kv_cache_format.quantize_rows, so the same bytes.
void quantize_kv_row(const char* values, int head_dim, int32_t dtype, int8_t* out) {
  using namespace engine_cpu;
  float x[kMaxHeadDim];
  with_storage_type(dtype, [&](auto element, DType type) {
    const auto* row = reinterpret_cast<const decltype(element)*>(values);
    for (int i = 0; i < head_dim; i += kLanes) store(x + i, load(row + i, type, lanes(head_dim - i)), kFloat32, lanes(head_dim - i));
  });
  float largest = 0.0f;
  for (int i = 0; i < head_dim; i++) largest = std::max(largest, std::fabs(x[i]));
  const float scale = largest / 127.0f;
  // PERF: a 32-row step divides ~370k values (30 layers); one at a time that was ~1 ms.
  const Vec divisor = splat(scale > 0.0f ? scale : 1.0f);
  for (int i = 0; i < head_dim; i += kLanes)
    store(x + i, round_to_integer(load(x + i, kFloat32, lanes(head_dim - i)) / divisor), kFloat32, lanes(head_dim - i));
  for (int i = 0; i < head_dim; i++) out[i] = scale > 0.0f ? int8_t(std::clamp(x[i], -127.0f, 127.0f)) : int8_t(0);
  std::memcpy(out + head_dim, &scale, sizeof scale);
}

// K and V of each row (after RoPE) into the row's cache slot.
void write_kv(const LayerDesc& l, const StepDesc& s, const char* qkv, int64_t qkv_width) {
  const int64_t size = element_size(s.dtype), kv_bytes = int64_t(l.num_kv_heads) * l.head_dim * size;
  const int64_t k_offset = int64_t(l.num_q_heads) * l.head_dim * size;
  if (s.kv_int8 != 0) {
    const int64_t row_bytes = l.head_dim + engine_cpu::kKvScaleBytes, slot_bytes = l.num_kv_heads * row_bytes;
    for (int64_t r = 0; r < s.rows; r++)
      for (int h = 0; h < l.num_kv_heads; h++) {
        const char* key = qkv + r * qkv_width * size + k_offset + h * l.head_dim * size;
        const int64_t at = s.slot_mapping[r] * slot_bytes + h * row_bytes;
        quantize_kv_row(key, l.head_dim, s.dtype, static_cast<int8_t*>(s.key_cache) + at);
        quantize_kv_row(key + kv_bytes, l.head_dim, s.dtype, static_cast<int8_t*>(s.value_cache) + at);
      }
    return;
  }
  for (int64_t r = 0; r < s.rows; r++) {
    const char* row = qkv + r * qkv_width * size;
    std::memcpy(static_cast<char*>(s.key_cache) + s.slot_mapping[r] * kv_bytes, row + k_offset, kv_bytes);
    std::memcpy(static_cast<char*>(s.value_cache) + s.slot_mapping[r] * kv_bytes, row + k_offset + kv_bytes, kv_bytes);
  }
}

// The attention half: h = norm(x [+ residual]) ... -> a [rows, hidden].
int attention_block(const LayerDesc& l, const StepDesc& s, const void* x, void* residual, char* a) {
  const int64_t size = element_size(s.dtype), rows = s.rows;
  const int64_t q_width = int64_t(l.num_q_heads) * l.head_dim, kv_width = int64_t(l.num_kv_heads) * l.head_dim;
  const int64_t qkv_width = q_width + 2 * kv_width;
  const bool levels = l.attention_levels != nullptr && s.rows_upto != nullptr;
  char* h = scratch(0, rows * l.hidden * size);
  char* qkv = scratch(1, rows * qkv_width * size);
  char* heads = scratch(2, rows * q_width * size);
  int status = rms_norm(x, l.hidden, residual, l.attention_norm, h, rows, l.hidden, l.eps, s.dtype, s.num_threads);
  std::vector<Tile> tiles;
  if (levels) {  // Q by tiles (a dropped head's query zero, as the tile path's), K and V for every row
    tiles = column_tiles(l.attention_levels, s.rows_upto, l.num_levels);
    std::memset(qkv, 0, rows * qkv_width * size);
    std::vector<Product> products;
    add_row_tiles(l.qkv, s, tiles, 0, qkv, qkv_width, &products);
    products.push_back(
        Product{rows, q_width, 2 * kv_width, 0, l.hidden / kBlock, qkv + q_width * size, qkv_width, true});
    status |= run_products(l.qkv, s, h, l.hidden, products);
  } else {
    status |= linear(l.qkv, s, h, l.hidden, qkv);
  }
  status |= rotary_embedding(qkv, rows, l.num_q_heads + l.num_kv_heads, l.head_dim, qkv_width, s.cos, s.sin, s.dtype,
                             s.num_threads);
  if (status != 0) return status;
  if (s.kv_int8 != 0 && l.head_dim > engine_cpu::kMaxHeadDim) return -1;  // quantize_kv_row's buffer
  write_kv(l, s, qkv, qkv_width);
  const int32_t* live = levels ? group_heads(l.attention_levels, s, l.num_levels, kv_width) : nullptr;
  status |= paged_decode_attention(qkv, qkv_width, s.key_cache, s.value_cache, s.block_tables, s.block_table_stride,
                                   s.seq_lens, live, heads, int(rows), l.num_q_heads, l.num_kv_heads, l.head_dim,
                                   l.block_size, l.scale, s.dtype, s.num_threads, l.rank_major, s.kv_int8);
  if (!levels) return status | linear(l.o, s, heads, q_width, a);
  status |= column_tile_sum(l.o, s, tiles, heads, q_width, a);
  add_side_paths(l.attention_levels, s, l.num_levels, l.hidden, h, a);
  return status;
}

// The FFN half: h = norm(a + residual) ... -> out [rows, hidden].
int ffn_block(const LayerDesc& l, const StepDesc& s, const char* a, void* residual, void* out) {
  const int64_t size = element_size(s.dtype), rows = s.rows, width = l.intermediate;
  char* h = scratch(0, rows * l.hidden * size);
  char* gate_up = scratch(1, rows * 2 * width * size);
  char* act = scratch(2, rows * width * size);
  int status = rms_norm(a, l.hidden, residual, l.ffn_norm, h, rows, l.hidden, l.eps, s.dtype, s.num_threads);
  if (l.ffn_levels == nullptr || s.rows_upto == nullptr) {
    status |= linear(l.gate_up, s, h, l.hidden, gate_up);
    status |= silu_and_mul(gate_up, 2 * width, act, width, rows, width, s.dtype, s.num_threads);
    return status | linear(l.down, s, act, width, static_cast<char*>(out));
  }
  // Gate rows [0, I) and up rows [I, 2I) by the same tiles; a neuron a row's level drops is
  // never written for that row, and no down tile reads it (SiLU runs over it all the same).
  const std::vector<Tile> tiles = column_tiles(l.ffn_levels, s.rows_upto, l.num_levels);
  std::vector<Product> products;
  add_row_tiles(l.gate_up, s, tiles, 0, gate_up, 2 * width, &products);
  add_row_tiles(l.gate_up, s, tiles, width, gate_up, 2 * width, &products);
  status |= run_products(l.gate_up, s, h, l.hidden, products);
  status |= silu_and_mul(gate_up, 2 * width, act, width, rows, width, s.dtype, s.num_threads);
  status |= column_tile_sum(l.down, s, tiles, act, width, static_cast<char*>(out));
  add_side_paths(l.ffn_levels, s, l.num_levels, l.hidden, h, static_cast<char*>(out));
  return status;
}

// Rows `order` of src (each `bytes` long) into dst: dst row i <- src row order[i]; or back.
void gather_rows(const char* src, char* dst, const int64_t* order, int64_t rows, int64_t bytes) {
  for (int64_t i = 0; i < rows; i++) std::memcpy(dst + i * bytes, src + order[i] * bytes, bytes);
}
void scatter_rows(const char* src, char* dst, const int64_t* order, int64_t rows, int64_t bytes) {
  for (int64_t i = 0; i < rows; i++) std::memcpy(dst + order[i] * bytes, src + i * bytes, bytes);
}

int layer_in_order(const LayerDesc& l, const StepDesc& s, void* x, void* residual, char* a, void* out) {
  // First layer: norm(x) alone, and the stream that the FFN half adds into is x itself.
  int status = attention_block(l, s, x, residual, a);
  if (status != 0) return status;
  return ffn_block(l, s, a, residual != nullptr ? residual : x, out);
}

}  // namespace

extern "C" {

// A level's side path (see side_path_rows) on x [rows, hidden] into out [rows, hidden] (rows
// x_stride / out_stride elements apart), for the layer-by-layer tile path.
int elastic_side_path(const float* lora_a, const float* lora_b_rows, const void* bias, int64_t rank, int64_t hidden,
                      const void* x, int64_t x_stride, void* out, int64_t out_stride, int64_t rows, int dtype) {
  if (rows < 0 || hidden <= 0 || dtype < 0 || dtype > 2 || (lora_a != nullptr && (lora_b_rows == nullptr || rank < 1)))
    return -1;
  const LevelDesc level{0, lora_a, lora_b_rows, bias, rank};
  side_path(level, hidden, x, x_stride, out, out_stride, rows, dtype);
  return 0;
}

// x, out [rows, hidden] contiguous; residual [rows, hidden] contiguous, or null for the first
// layer (the residual stream is then x, updated in place as the layer-by-layer path does).
// `a` [rows, hidden]: the attention output, a buffer of the caller's.  Returns 0, or -1 where a
// kernel refuses its arguments (nothing is then guaranteed about out).
int decode_layer(const LayerDesc* layer, const StepDesc* step, void* x, void* residual, void* a, void* out) {
  if (layer == nullptr || step == nullptr || step->rows <= 0 || step->dtype < 0 || step->dtype > 2) return -1;
  if (step->order == nullptr) return layer_in_order(*layer, *step, x, residual, static_cast<char*>(a), out);
  // Rows of mixed levels, not in level order: the layer runs on level-order copies (the step's
  // arrays are in level order already), and the results go back to the caller's rows.
  const int64_t bytes = layer->hidden * element_size(step->dtype), rows = step->rows;
  char* xs = scratch(4, rows * bytes);
  char* rs = residual != nullptr ? scratch(5, rows * bytes) : nullptr;
  char* outs = scratch(7, rows * bytes);
  gather_rows(static_cast<const char*>(x), xs, step->order, rows, bytes);
  if (rs != nullptr) gather_rows(static_cast<const char*>(residual), rs, step->order, rows, bytes);
  const int status = layer_in_order(*layer, *step, xs, rs, static_cast<char*>(a), outs);
  scatter_rows(outs, static_cast<char*>(out), step->order, rows, bytes);
  // The residual stream (x itself in the first layer) was updated in place.
  scatter_rows(rs != nullptr ? rs : xs, static_cast<char*>(rs != nullptr ? residual : x), step->order, rows, bytes);
  return status;
}

// Layers layers[0 .. num_layers) of one step in one call, each on its own cache (key_caches[i],
// value_caches[i]; the step's own cache pointers are ignored): what num_layers decode_layer calls
// would do, without a trip through Python between layers (~40 us a layer on SmolLM2's 30).
// x and residual as decode_layer takes them (residual null: x is the residual stream, updated in
// place).  Each layer's output is the next one's x; they land in `out` and `spare` by turns, the
// last in `out`.  a, out, spare: [rows, hidden] buffers of the caller's, none of them x or
// residual.  Returns 0, or the first refusal's -1 (the layers after it do not run).
int decode_layers(const LayerDesc* const* layers, void* const* key_caches, void* const* value_caches,
                  int64_t num_layers, const StepDesc* step, void* x, void* residual, void* a, void* out,
                  void* spare) {
  if (layers == nullptr || key_caches == nullptr || value_caches == nullptr || step == nullptr || num_layers <= 0)
    return -1;
  StepDesc layer_step = *step;
  void* stream = residual != nullptr ? residual : x;
  void* input = x;
  void* input_residual = residual;
  for (int64_t i = 0; i < num_layers; i++) {
    void* output = (num_layers - 1 - i) % 2 == 0 ? out : spare;
    layer_step.key_cache = key_caches[i];
    layer_step.value_cache = value_caches[i];
    const int status = decode_layer(layers[i], &layer_step, input, input_residual, a, output);
    if (status != 0) return status;
    input = output;
    input_residual = stream;
  }
  return 0;
}

}  // extern "C"

#else  // no AVX2 build flags: the engine keeps its layer-by-layer path

extern "C" int decode_layer(const void*, const void*, void*, void*, void*, void*) { return -1; }
extern "C" int decode_layers(const void* const*, void* const*, void* const*, int64_t, const void*, void*, void*, void*,
                             void*, void*) {
  return -1;
}
extern "C" int elastic_side_path(const float*, const float*, const void*, int64_t, int64_t, const void*, int64_t, void*,
                                 int64_t, int64_t, int) {
  return -1;
}

#endif
