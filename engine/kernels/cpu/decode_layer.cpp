// One decoder layer of a decode step in one call: the same kernels the layers call one by one
// (rms_norm, quantized_linear or quantized_linear_q8, rotary_embedding, paged_decode_attention,
// silu_and_mul), in the same order on the same data, with the K/V write between them.
//
// Why: a single decode stream runs ~12 kernels a layer, each a few microseconds of Python
// (a layer object, argument checks, a tensor allocation, a ctypes call) around its work: ~2.6 ms
// of a ~9.5 ms step on SmolLM2's 30 layers (benchmarks/README.md, "A row-major Q8 GEMV").  Here a
// layer is one ctypes call; what each kernel computes is unchanged, so the result is the same bits
// as the layer-by-layer path (tests/kernels/test_cpu_decode_layer.py holds it to that).
//
// What it covers: every row a decode (one token each), every linear as quantized blocks (a prefix
// view, a bias and permuted inputs allowed: an elastic model's full level), attention through the
// paged decode kernel (grouped or rank-major heads).  engine/model/layers/fused_decode.py decides
// when a layer qualifies; anything else runs layer by layer.
//
//     h = norm(x [+ residual])            residual <- x + residual (or x itself, the first layer)
//     qkv = h Wqkv^T;  RoPE on Q and K;   K, V -> their cache slots
//     a = attention(Q, cache) Wo^T
//     h = norm(a + residual)              residual <- a + residual
//     out = (silu(h Wg^T) * (h Wu^T)) Wd^T

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "simd.h"

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
                           int head_dim, int block_size, float scale, int dtype, int num_threads, int rank_major);
int quantized_linear(const void* x, int64_t x_stride, const uint8_t* weight, int64_t weight_stride, const void* bias,
                     void* out, int64_t out_stride, int64_t m, int64_t n, int64_t k_blocks, int format, int dtype,
                     int num_threads);
int quantized_linear_q8(const void* x, int64_t x_stride, const uint8_t* weight, int64_t weight_stride,
                        const void* bias, void* out, int64_t out_stride, int64_t m, int64_t n, int64_t k_blocks,
                        int format, int dtype, int vnni, int num_threads);
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
};

// What stays the same from step to step (ctypes.Structure in fused_decode.py: keep in sync).
struct LayerDesc {
  LinearDesc qkv, o, gate_up, down;
  const void* attention_norm;  // [hidden] in the activations' dtype
  const void* ffn_norm;
  float eps, scale;  // RMSNorm epsilon, attention scale
  int32_t hidden, num_q_heads, num_kv_heads, head_dim, intermediate, block_size, rank_major;
};

// This step's (ctypes.Structure likewise).
struct StepDesc {
  int64_t rows;                 // decode rows, one token each
  const void* cos;              // [rows, head_dim / 2] in the activations' dtype
  const void* sin;
  const int64_t* slot_mapping;  // [rows]
  const int32_t* block_tables;  // [rows, block_table_stride]
  int64_t block_table_stride;
  const int32_t* seq_lens;      // [rows]
  void* key_cache;              // [slots, num_kv_heads, head_dim]
  void* value_cache;
  int32_t dtype, q8, vnni, num_threads;
};

int64_t element_size(int dtype) { return dtype == 0 ? 4 : 2; }

// A per-thread byte buffer of at least `bytes`; slot s of a few.
char* scratch(int slot, int64_t bytes) {
  static thread_local std::vector<char> buffers[4];
  if (int64_t(buffers[slot].size()) < bytes) buffers[slot].resize(bytes);
  return buffers[slot].data();
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
  if (s.q8)
    return quantized_linear_q8(x, x_stride, w.blocks, w.row_stride, w.bias, out, w.out_features, s.rows, w.out_features,
                               w.in_features / kBlock, w.format, s.dtype, s.vnni, s.num_threads);
  return quantized_linear(x, x_stride, w.blocks, w.row_stride, w.bias, out, w.out_features, s.rows, w.out_features,
                          w.in_features / kBlock, w.format, s.dtype, s.num_threads);
}

// K and V of each row (after RoPE) into the row's cache slot.
void write_kv(const LayerDesc& l, const StepDesc& s, const char* qkv, int64_t qkv_width) {
  const int64_t size = element_size(s.dtype), kv_bytes = int64_t(l.num_kv_heads) * l.head_dim * size;
  const int64_t k_offset = int64_t(l.num_q_heads) * l.head_dim * size;
  for (int64_t r = 0; r < s.rows; r++) {
    const char* row = qkv + r * qkv_width * size;
    std::memcpy(static_cast<char*>(s.key_cache) + s.slot_mapping[r] * kv_bytes, row + k_offset, kv_bytes);
    std::memcpy(static_cast<char*>(s.value_cache) + s.slot_mapping[r] * kv_bytes, row + k_offset + kv_bytes, kv_bytes);
  }
}

// The attention half: h = norm(x [+ residual]) ... -> a [rows, hidden].
int attention_block(const LayerDesc& l, const StepDesc& s, const void* x, void* residual, char* a) {
  const int64_t size = element_size(s.dtype), rows = s.rows;
  const int64_t q_width = int64_t(l.num_q_heads) * l.head_dim;
  const int64_t qkv_width = q_width + 2 * int64_t(l.num_kv_heads) * l.head_dim;
  char* h = scratch(0, rows * l.hidden * size);
  char* qkv = scratch(1, rows * qkv_width * size);
  char* heads = scratch(2, rows * q_width * size);
  int status = rms_norm(x, l.hidden, residual, l.attention_norm, h, rows, l.hidden, l.eps, s.dtype, s.num_threads);
  status |= linear(l.qkv, s, h, l.hidden, qkv);
  status |= rotary_embedding(qkv, rows, l.num_q_heads + l.num_kv_heads, l.head_dim, qkv_width, s.cos, s.sin, s.dtype,
                             s.num_threads);
  if (status != 0) return status;
  write_kv(l, s, qkv, qkv_width);
  status |= paged_decode_attention(qkv, qkv_width, s.key_cache, s.value_cache, s.block_tables, s.block_table_stride,
                                   s.seq_lens, nullptr, heads, int(rows), l.num_q_heads, l.num_kv_heads, l.head_dim,
                                   l.block_size, l.scale, s.dtype, s.num_threads, l.rank_major);
  return status | linear(l.o, s, heads, q_width, a);
}

// The FFN half: h = norm(a + residual) ... -> out [rows, hidden].
int ffn_block(const LayerDesc& l, const StepDesc& s, const char* a, void* residual, void* out) {
  const int64_t size = element_size(s.dtype), rows = s.rows;
  char* h = scratch(0, rows * l.hidden * size);
  char* gate_up = scratch(1, rows * 2 * int64_t(l.intermediate) * size);
  char* act = scratch(2, rows * int64_t(l.intermediate) * size);
  int status = rms_norm(a, l.hidden, residual, l.ffn_norm, h, rows, l.hidden, l.eps, s.dtype, s.num_threads);
  status |= linear(l.gate_up, s, h, l.hidden, gate_up);
  status |= silu_and_mul(gate_up, 2 * int64_t(l.intermediate), act, l.intermediate, rows, l.intermediate, s.dtype,
                         s.num_threads);
  return status | linear(l.down, s, act, l.intermediate, static_cast<char*>(out));
}

}  // namespace

extern "C" {

// x, out [rows, hidden] contiguous; residual [rows, hidden] contiguous, or null for the first
// layer (the residual stream is then x, updated in place as the layer-by-layer path does).
// `a` [rows, hidden]: the attention output, a buffer of the caller's.  Returns 0, or -1 where a
// kernel refuses its arguments (nothing is then guaranteed about out).
int decode_layer(const LayerDesc* layer, const StepDesc* step, void* x, void* residual, void* a, void* out) {
  if (layer == nullptr || step == nullptr || step->rows <= 0 || step->dtype < 0 || step->dtype > 2) return -1;
  // First layer: norm(x) alone, and the stream that the FFN half adds into is x itself.
  int status = attention_block(*layer, *step, x, residual, static_cast<char*>(a));
  if (status != 0) return status;
  return ffn_block(*layer, *step, static_cast<char*>(a), residual != nullptr ? residual : x, out);
}

}  // extern "C"

#else  // no AVX2 build flags: the engine keeps its layer-by-layer path

extern "C" int decode_layer(const void*, const void*, void*, void*, void*, void*) { return -1; }

#endif
