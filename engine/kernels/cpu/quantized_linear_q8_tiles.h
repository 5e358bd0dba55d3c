// The tiles of quantized_linear_q8.cpp: included by it twice, once as namespace `plain` and once
// as namespace `vnni` inside `#pragma GCC target` for AVX-VNNI (AVX2 build) or AVX512-VNNI
// (AVX-512 builds), with ENGINE_Q8_VNNI 0 or 1.  A function with VNNI enabled can only inline
// functions compiled for it or for less, so every function on the path to the dot-product
// instruction is compiled in the region; and the plain copy is compiled outside it, so that no
// VNNI instruction can reach a CPU without VNNI.  No include guard, on purpose.

constexpr bool kVnni = ENGINE_Q8_VNNI;

#if ENGINE_Q8_VNNI
// acc + the sums of 4 byte products a lane (u8 x s8, into int32: nothing saturates).
#if defined(ENGINE_CPU_AVX512)
inline Ints dot4(Ints acc, Ints u8, Ints s8) { return _mm512_dpbusd_epi32(acc, u8, s8); }
#else
inline Ints dot4(Ints acc, Ints u8, Ints s8) { return _mm256_dpbusd_avx_epi32(acc, u8, s8); }
#endif
#else
inline Ints dot4(Ints acc, Ints, Ints) { return acc; }  // never called: kVnni is false
#endif

// ---- a tile: MR rows of x times the panel's kCols columns ----

// The block's integer dot products of MR rows (one int32 lane a column).
template <int F, int MR>
inline void block_dots(const uint8_t* steps, const int8_t* const (&xq)[MR], Ints (&isum)[MR]) {
  if (F == kQ8_0 && kVnni) {  // (x + 128) w, xq the rows' q_offset: the offset sums come off in tile()
    for (int i = 0; i < MR; i++) isum[i] = zero_ints();
    for (int t = 0; t < kSteps; t++) {
      const Ints w = load_ints(steps + t * kStepBytes);
      for (int i = 0; i < MR; i++) isum[i] = in_register(dot4(isum[i], broadcast_ints(load_i32(xq[i] + 4 * t)), w));
    }
    return;
  }
  if (F == kQ8_0 || kVnni) {
    for (int i = 0; i < MR; i++) isum[i] = zero_ints();
    for (int t = 0; t < kSteps; t++) {
      Ints w = load_ints(steps + t * kStepBytes);
      Signs signs{};
      if (F == kQ8_0) {
        signs = signs_of(w);
        w = abs8(w);
      }
      for (int i = 0; i < MR; i++) {
        Ints x = broadcast_ints(load_i32(xq[i] + 4 * t));
        if (F == kQ8_0) x = with_signs(x, signs);
        if constexpr (kVnni) {
          isum[i] = in_register(dot4(isum[i], w, x));
        } else {
          isum[i] = in_register(add32(isum[i], widen_pairs(maddubs(w, x))));
        }
      }
    }
    return;
  }
  Ints partial[MR];  // int16 pair sums: at most 8 steps * 2 * 15 * 127 = 30480
  const Ints w0 = load_ints(steps);
  for (int i = 0; i < MR; i++) partial[i] = in_register(maddubs(w0, broadcast_ints(load_i32(xq[i]))));
  for (int t = 1; t < kSteps; t++) {
    const Ints w = load_ints(steps + t * kStepBytes);
    for (int i = 0; i < MR; i++)
      partial[i] = in_register(add16(partial[i], maddubs(w, broadcast_ints(load_i32(xq[i] + 4 * t)))));
  }
  for (int i = 0; i < MR; i++) isum[i] = widen_pairs(partial[i]);
}

template <int F, int MR, typename T>
void tile(const Problem& p, const QuantizedRows& x, const Panel& panel, int64_t m0, int64_t c0,
          PanelPrefetch& prefetch) {
  Vec acc[MR];
  for (int i = 0; i < MR; i++) acc[i] = splat(0.0f);
  const int8_t* x_bytes = F == kQ8_0 && kVnni ? reinterpret_cast<const int8_t*>(x.q_offset) : x.q;  // block_dots'
  for (int64_t b = 0; b < p.k_blocks; b++) {
    prefetch.step();
    const int8_t* xq[MR];
    for (int i = 0; i < MR; i++) xq[i] = x_bytes + ((m0 + i) * x.k_blocks + b) * kBlock;
    Ints isum[MR];
    block_dots<F, MR>(panel.bytes + b * kPanelBlockBytes, xq, isum);
    const Vec dw = load_floats(panel.scale + b * kCols);
    Ints offset_sum = zero_ints();
    if (F == kQ8_0 && kVnni) offset_sum = load_ints(offset_sums(panel) + b * kCols);
    for (int i = 0; i < MR; i++) {
      const int64_t at = (m0 + i) * x.k_blocks + b;
      if (F == kQ4_0) isum[i] = sub32(isum[i], broadcast_ints(8 * x.asum[at]));
      if (F == kQ8_0 && kVnni) isum[i] = sub32(isum[i], offset_sum);
      acc[i] = fmadd(dw * splat(x.scale[at]), to_float(isum[i]), acc[i]);
      if (F == kQ4_1) acc[i] = fmadd(load_floats(panel.min + b * kCols), splat(x.sum[at]), acc[i]);
    }
  }
  const Mask live = lanes(p.n - c0);
  const Vec bias = p.bias ? load(static_cast<const T*>(p.bias) + c0, p.dtype, live) : splat(0.0f);
  for (int i = 0; i < MR; i++)
    store(static_cast<T*>(p.out) + (m0 + i) * p.out_stride + c0, acc[i] + bias, p.dtype, live);
}

template <int F, typename T>
void column_groups(const Problem& p, const QuantizedRows& x) {
  static thread_local std::vector<uint8_t> panel_bytes;
  static thread_local std::vector<float> panel_scales;
  const bool packed = p.panels.packed != nullptr && p.panels.row0 % kCols == 0;
  Panel panel{nullptr, nullptr, nullptr};
  if (!packed)
    panel = Panel{grown(panel_bytes, p.k_blocks * kPanelBlockBytes), grown(panel_scales, 2 * p.k_blocks * kCols),
                  panel_scales.data() + p.k_blocks * kCols};
  int64_t begin, end;
  thread_share((p.n + kCols - 1) / kCols, &begin, &end);
  const int64_t tiles_a_group = (p.m + kMaxTileRows - 1) / kMaxTileRows;
  for (int64_t group = begin; group < end; group++) {
    const int64_t c0 = group * kCols;
    PanelPrefetch prefetch;
    if (packed) {  // rows past n (a last partial group) are the next rows or padding: never stored
      const int64_t packed_group = (p.panels.row0 + c0) / kCols;
      panel = packed_panel(p.panels, F, packed_group, p.panels.block0);
      if (p.m >= kPrefetchRows && group + 1 < end)
        prefetch = PanelPrefetch(p.panels, F, packed_group + 1, p.k_blocks, tiles_a_group * p.k_blocks);
    } else {
      fill_panel<F>(p.weight, p.weight_stride, p.n, c0, p.k_blocks, panel);
    }
    int64_t i = 0;
    for (; i + kMaxTileRows <= p.m; i += kMaxTileRows) tile<F, kMaxTileRows, T>(p, x, panel, i, c0, prefetch);
    switch (p.m - i) {
#if defined(ENGINE_CPU_AVX512)
      case 7: tile<F, 7, T>(p, x, panel, i, c0, prefetch); break;
      case 6: tile<F, 6, T>(p, x, panel, i, c0, prefetch); break;
      case 5: tile<F, 5, T>(p, x, panel, i, c0, prefetch); break;
      case 4: tile<F, 4, T>(p, x, panel, i, c0, prefetch); break;
#endif
      case 3: tile<F, 3, T>(p, x, panel, i, c0, prefetch); break;
      case 2: tile<F, 2, T>(p, x, panel, i, c0, prefetch); break;
      case 1: tile<F, 1, T>(p, x, panel, i, c0, prefetch); break;
    }
  }
}

// This thread's share of out, x quantized already.
template <int F, typename T>
void product(const Problem& p, const QuantizedRows& x) {
  switch (p.m) {
    case 0: break;
    case 1: gemv<F, 1, T>(p, x); break;
    case 2: gemv<F, 2, T>(p, x); break;
    case 3: gemv<F, 3, T>(p, x); break;
    case 4: gemv<F, 4, T>(p, x); break;
    default: column_groups<F, T>(p, x);
  }
}

template <int F, typename T>
void tiled_products(const void* x, int64_t x_stride, int64_t m, int64_t k_blocks, const Q8Tile* tiles, int64_t count,
                    DType dtype, int num_threads) {
  const QuantizedRows q = quantized_rows_buffer(m, k_blocks, F == kQ8_0 && kVnni);  // the calling thread's, shared
  int64_t work = 0;
  for (int64_t i = 0; i < count; i++) work += tiles[i].m * tiles[i].n * tiles[i].k_blocks;
#pragma omp parallel num_threads(num_threads) if (work >= kParallelWork)
  {
    int64_t begin, end;
    thread_share(m, &begin, &end);
    quantize_rows(static_cast<const T*>(x), x_stride, dtype, begin, end, q);
#pragma omp barrier
    for (int64_t i = 0; i < count; i++) {
      const Q8Tile& t = tiles[i];
      const Problem p{x,   x_stride, t.weight,   t.weight_stride, t.bias, t.out,
                      t.out_stride, t.m, t.n, t.k_blocks, dtype, t.panels};
      product<F, T>(p, blocks_from(q, t.block0));
    }
  }
}

template <typename T>
void run_tiles(const void* x, int64_t x_stride, int64_t m, int64_t k_blocks, const Q8Tile* t, int64_t count, int format,
               DType dtype, int num_threads) {
  switch (format) {
    case kQ4_0: tiled_products<kQ4_0, T>(x, x_stride, m, k_blocks, t, count, dtype, num_threads); break;
    case kQ4_1: tiled_products<kQ4_1, T>(x, x_stride, m, k_blocks, t, count, dtype, num_threads); break;
    case kQ8_0: tiled_products<kQ8_0, T>(x, x_stride, m, k_blocks, t, count, dtype, num_threads); break;
  }
}
