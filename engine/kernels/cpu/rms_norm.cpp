// RMSNorm over the rows of [tokens, hidden], optionally fused with the residual add before it,
// with Hugging Face Llama's numerics so that the CPU path matches the torch one:
//
//   residual <- round(x + residual)                     (only when a residual is given)
//   out      <- round(weight * round(r * 1/sqrt(mean(r^2) + eps)))   r = that sum, or x
//
// round() is rounding to the model dtype (a no-op for fp32): HF normalizes in fp32, casts to the
// model dtype, then multiplies by the weight in the model dtype.  The mean of squares is an fp32
// sum in another order than torch's, so bf16 results may differ from the torch path's in the last
// bit of rare elements.
//
// Why: in a decode step of 32 rows the torch version is eight ops of ~2.5 us of dispatch each,
// 61 times a step.

#include <cmath>
#include <cstdint>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include "simd.h"

namespace {

using namespace engine_cpu;

template <typename T>
void norm_row(const T* x, T* residual, const T* weight, T* out, int64_t hidden, float eps, DType dtype) {
  const T* source = x;
  if (residual != nullptr) {
    for (int64_t i = 0; i < hidden; i += 16) {
      const __mmask16 live = lanes(hidden - i);
      store16(residual + i, _mm512_add_ps(load16(x + i, dtype, live), load16(residual + i, dtype, live)), dtype, live);
    }
    source = residual;  // the norm reads the sum as stored, rounded
  }
  __m512 squares = _mm512_setzero_ps();
  for (int64_t i = 0; i < hidden; i += 16) {
    const __m512 v = load16(source + i, dtype, lanes(hidden - i));
    squares = _mm512_fmadd_ps(v, v, squares);
  }
  const float inverse_rms = 1.0f / std::sqrt(_mm512_reduce_add_ps(squares) / static_cast<float>(hidden) + eps);
  const __m512 scale = _mm512_set1_ps(inverse_rms);
  for (int64_t i = 0; i < hidden; i += 16) {
    const __mmask16 live = lanes(hidden - i);
    const __m512 normalized = round_to(dtype, _mm512_mul_ps(load16(source + i, dtype, live), scale));
    store16(out + i, _mm512_mul_ps(load16(weight + i, dtype, live), normalized), dtype, live);
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
