// quantized_linear_q8.cpp's entry points, for the kernels that call it (decode_layer.cpp).
#pragma once

#include <cstdint>

extern "C" {

// A whole weight's panels, packed once (quantized_linear_q8_pack_panels), and where a product's
// weight lies in it: its first row `row0` (a multiple of the build's panel width for the panels
// to be used; otherwise the product packs its own, as without) and first block `block0` of the
// `k_blocks` blocks a packed row has.  All null / 0: no packed panels.
struct Q8Panels {
  const uint8_t* packed;
  int64_t k_blocks, row0, block0;
};

// One product of quantized_linear_q8_tiles: x[:m, 32 block0 : 32 (block0 + k_blocks)] times n
// weight rows of k_blocks blocks each (rows weight_stride bytes apart) -> out [m, n] (rows
// out_stride elements apart), plus bias [n] if not null.  ctypes mirrors none of this: only C++
// callers build these.
struct Q8Tile {
  const uint8_t* weight;
  int64_t weight_stride;
  const void* bias;
  void* out;
  int64_t out_stride;
  int64_t m, n, block0, k_blocks;
  Q8Panels panels;
};

int quantized_linear_q8(const void* x, int64_t x_stride, const uint8_t* weight, int64_t weight_stride,
                        const void* bias, void* out, int64_t out_stride, int64_t m, int64_t n, int64_t k_blocks,
                        int format, int dtype, int vnni, int num_threads, const uint8_t* packed,
                        int64_t packed_k_blocks, int64_t packed_row0, int64_t packed_block0);

int quantized_linear_q8_tiles(const void* x, int64_t x_stride, int64_t m, int64_t k_blocks, const Q8Tile* tiles,
                              int64_t count, int format, int dtype, int vnni, int num_threads);
}
