// RMSNorm over the rows of [tokens, hidden], optionally fused with the residual add before it,
// with Hugging Face Llama's numerics so that the CPU path matches the torch one:
//
//   residual <- round(x + residual)                     (only when a residual is given)
//   out      <- round(weight * round(r * 1/sqrt(mean(r^2) + eps)))   r = that sum, or x
//
// round() is rounding to the model dtype (a no-op for fp32): HF normalizes in fp32, casts to the
// model dtype, then multiplies by the weight in the model dtype.  The mean of squares is an fp32
// sum in another order than torch's, so bf16 results may differ from the torch path's in the last
// bit of rare elements.  Every build (AVX2, AVX-512) sums in the same order (kSumLanes in
// simd.h), so all give the same bits: with 8 partial sums instead of 16, the AVX2 build's bf16
// results differed from torch's by more than one step in a few elements of 266K.
//
// Why: in a decode step of 32 rows the torch version is eight ops of ~2.5 us of dispatch each,
// 61 times a step.

#include <cmath>
#include <cstdint>

#include "simd.h"

#if defined(ENGINE_CPU_ISA)

namespace {

using namespace engine_cpu;

template <typename T>
void norm_row(const T* x, T* residual, const T* weight, T* out, int64_t hidden, float eps, DType dtype) {
  const T* source = x;
  if (residual != nullptr) {
    for (int64_t i = 0; i < hidden; i += kLanes) {
      const Mask live = lanes(hidden - i);
      store(residual + i, load(x + i, dtype, live) + load(residual + i, dtype, live), dtype, live);
    }
    source = residual;  // the norm reads the sum as stored, rounded
  }
  Vec squares[kSumVecs];
  for (Vec& partial : squares) partial = splat(0.0f);
  for (int64_t i = 0; i < hidden; i += kSumLanes)
    for (int j = 0; j < kSumVecs; j++) {
      const Vec v = load(source + i + j * kLanes, dtype, lanes(hidden - i - j * kLanes));
      squares[j] = fmadd(v, v, squares[j]);
    }
  const float inverse_rms = 1.0f / std::sqrt(reduce_add(squares) / static_cast<float>(hidden) + eps);
  const Vec scale = splat(inverse_rms);
  for (int64_t i = 0; i < hidden; i += kLanes) {
    const Mask live = lanes(hidden - i);
    const Vec normalized = round_to(dtype, load(source + i, dtype, live) * scale);
    store(out + i, load(weight + i, dtype, live) * normalized, dtype, live);
  }
}

template <typename T>
void norm_rows(const void* x, int64_t x_stride, void* residual, const void* weight, void* out, int64_t rows,
               int64_t hidden, float eps, DType dtype, int num_threads) {
  // Small batches stay on the calling thread: waking the pool costs more than the work.
#pragma omp parallel for num_threads(num_threads) if (rows * hidden >= (1 << 16))
  for (int64_t row = 0; row < rows; row++)
    norm_row(static_cast<const T*>(x) + row * x_stride,
             residual == nullptr ? nullptr : static_cast<T*>(residual) + row * hidden,
             static_cast<const T*>(weight), static_cast<T*>(out) + row * hidden, hidden, eps, dtype);
}

}  // namespace

// x [rows, hidden] with rows x_stride apart; residual (or null), weight and out contiguous.
// Returns 0, or -1 for a dtype it does not handle.
extern "C" int rms_norm(const void* x, int64_t x_stride, void* residual, const void* weight, void* out,
                        int64_t rows, int64_t hidden, float eps, int dtype, int num_threads) {
  return with_storage_type(dtype, [&](auto element, DType type) {
    norm_rows<decltype(element)>(x, x_stride, residual, weight, out, rows, hidden, eps, type, num_threads);
  });
}

#endif
