// Each OpenMP thread's contiguous share of a parallel loop, for the kernels that split work by hand
// inside one `#pragma omp parallel` region (the quantized linears: a thread streams its own weight
// rows).  Internal linkage, as in simd.h: every build is its own library.
#pragma once

#include <cstdint>

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace {

// This thread's share [begin, end) of `count` items.
inline void thread_share(int64_t count, int64_t* begin, int64_t* end) {
#if defined(_OPENMP)
  const int64_t thread = omp_get_thread_num(), threads = omp_get_num_threads();
#else
  const int64_t thread = 0, threads = 1;
#endif
  *begin = count * thread / threads;
  *end = count * (thread + 1) / threads;
}

}  // namespace
