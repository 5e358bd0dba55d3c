// Paged decode attention for x86 CPUs with AVX2 or AVX-512: one query token per sequence, attending
// over its context straight from the paged KV cache.
//
// Why C++ beside the torch path (engine/model/attention_backends/torch_backend.py): torch can only
// attend over a paged cache after gathering each sequence's K and V into contiguous buffers
// (index_select), which reads the context from memory, writes it out and reads it again in two
// small batched matmuls.  This kernel reads each K and V row once, where it lies.  On the 2-core
// dev machine (bf16, SmolLM2, K/V from memory, benchmarks/cpu_decode_attention.py) one layer's
// decode attention over 64 sequences of ~512 tokens went from ~3.2 ms to ~1.0 ms (the AVX-512 build).
//
// Layout (shared with the torch path and the Triton kernels):
//   query           [num_seqs, num_q_heads, head_dim], heads contiguous, rows query_stride apart
//   out             [num_seqs, num_q_heads, head_dim], contiguous
//   key/value cache [num_slots, num_kv_heads, row] rows, slot = block * block_size + offset; a row
//                   is head_dim values of the query's dtype, or with kv_int8 head_dim int8 values and
//                   their fp32 scale (engine/kernels/kv_cache_format.py)
//   block_tables    [num_seqs, block_table_stride] int32; seq_lens [num_seqs] int32
// Query heads h * group .. h * group + group - 1 share KV head h (GQA); with rank_major, query
// head r * num_kv_heads + h is KV head h's r-th (an elastic model's slots, which keep a level's
// heads a prefix: engine/model/layers/attention.py), and the output has the query's order.
//
// Numerics: the query is scaled in fp32, scores, softmax and the weighted sum of V stay fp32; only
// the output is rounded to the query's dtype (round to nearest even).  Every build adds in the same
// order (the dot products and the softmax sum through kSumLanes partial sums, simd.h), so all give
// the same bits.  An int8 row's scale multiplies its score (q . K = s (q . k_int8)) and its softmax
// weight (w s V_int8): once a row, not once a value.
//
// Work split: tasks handed out dynamically over OpenMP threads (the OpenMP runtime is torch's own:
// the library is loaded after torch, which loaded libgomp.so.1), of two kinds:
//   - one (sequence, KV head): streams its context twice (K for the scores, V for the sum) in block
//     order, prefetching ahead since blocks are scattered (attend_one);
//   - one whole sequence, every KV head in one pass over each block (attend_sequence), for rows at
//     few heads a group (an elastic level's) in batches large enough to keep the threads busy.
// Both give the same bits.  What else was tried and measured no better: whole-sequence tasks for
// rows at every head (their arithmetic then sets the pace: 0.85-0.97x), and bf16 dot products
// (vdpbf16ps) with a shuffle-tree reduction for the scores (2-5%: the passes wait on memory, not
// arithmetic).

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "simd.h"

#if defined(ENGINE_CPU_ISA)

namespace {

using namespace engine_cpu;

constexpr int kMaxGroup = 16;     // query heads per KV head
// head_dim: a multiple of 16 (in every build), up to kMaxHeadDim (simd.h)
constexpr int kMaxRowVecs = kMaxHeadDim / kLanes;

// scores[0 .. len) <- exp(scores - max); returns their sum.
float exp_and_sum(float* scores, int len, float max) {
  const Vec shift = splat(max);
  Vec total[kSumVecs];
  for (Vec& partial : total) partial = splat(0.0f);
  for (int p = 0; p < len; p += kSumLanes)
    for (int j = 0; j < kSumVecs; j++) {
      const Mask live = lanes(len - p - j * kLanes);
      const Vec e = exp_nonpositive(load(scores + p + j * kLanes, kFloat32, live) - shift);
      store(scores + p + j * kLanes, e, kFloat32, live);
      total[j] = total[j] + keep(live, e);  // dead lanes hold exp(0 - max)
    }
  return reduce_add(total);
}

struct Problem {
  const void* query;
  int64_t query_stride;  // elements from one sequence's query row to the next (rows may be views)
  const void* key_cache;
  const void* value_cache;
  const int32_t* block_tables;
  int64_t block_table_stride;
  const int32_t* seq_lens;
  // Query heads each sequence uses per KV group (nullptr: all of them).  An elastic level keeps
  // the first r heads of every group (engine/model/layers/attention.py): the kernel attends for
  // those and writes zeros for the rest, so a row at a third of the heads costs about a third.
  const int32_t* group_heads;
  void* out;
  int num_q_heads, num_kv_heads, head_dim, block_size;
  bool rank_major;  // query (and output) heads in rank-major slots, see the layout above
  float scale;
  DType dtype;      // the query's and the output's
  int64_t row_elems;  // a cache row's elements: head_dim, or head_dim + 4 bytes for int8
};

// The scale of a cache row (1 for rows in the query's dtype, which is then never multiplied).
template <typename KV>
inline float row_scale(const KV* row, int head_dim) {
  if constexpr (std::is_same_v<KV, int8_t>) {
    float scale;
    std::memcpy(&scale, row + head_dim, sizeof scale);
    return scale;
  } else {
    return 1.0f;
  }
}

// Asks for one head's rows of a block ahead of use: blocks lie anywhere in the cache, so the
// hardware prefetcher cannot guess the next one.  Volatile asm, not _mm_prefetch: GCC deletes a
// loop whose body is only prefetch builtins (it has no observable effect), at -O2 always and at
// -O3 depending on inlining.
//
// Into L2 (prefetcht1), not L1: with the rows bound for L1 the two threads read K/V at ~11 GB/s
// on the 2-core AMD EPYC (32 sequences x ~256 tokens, bf16, 30 layers' caches, ms a layer: 0.45),
// into L2 at ~17 GB/s (0.30; the AVX2 build 0.57 -> 0.39; with one query head a group, an elastic
// level's, 0.39 -> 0.27): an L1 prefetch holds one of the core's few L1 miss buffers until its
// line arrives, so at most a couple of dozen lines are in flight, where an L2 prefetch leaves
// them to the L2's deeper queue; the lines then come from L2 a block later, in a few cycles.
// Every cache line a row touches: an int8 row (68 bytes at head_dim 64) may span three.
template <typename T>
inline void prefetch_block(const T* head_rows, int32_t block, const Problem& pb, int64_t row_stride) {
  const char* first = reinterpret_cast<const char*>(head_rows + static_cast<int64_t>(block) * pb.block_size * row_stride);
  const int64_t row_bytes = pb.row_elems * static_cast<int64_t>(sizeof(T)), stride_bytes = row_stride * sizeof(T);
  for (int i = 0; i < pb.block_size; i++) {
    const char* row = first + i * stride_bytes;
    const char* line = reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(row) & ~uintptr_t{63});
    for (; line < row + row_bytes; line += 64) asm volatile("prefetcht1 %0" : : "m"(*line));
  }
}

// Called at each block boundary `start`: asks for the next two blocks, so a block's rows are on
// their way while the one before is computed.  Measured here (64 sequences x 512 tokens, K/V from
// memory, ms a layer): no prefetch 2.37, the next block 1.6-1.7, the next two 1.29-1.35, three no
// better.
template <typename T>
inline void prefetch_ahead(const T* head_rows, const int32_t* blocks, int start, int len, const Problem& pb,
                           int64_t row_stride) {
  const int block = start / pb.block_size;
  if (start + pb.block_size < len) prefetch_block(head_rows, blocks[block + 1], pb, row_stride);
  if (start + 2 * pb.block_size < len) prefetch_block(head_rows, blocks[block + 2], pb, row_stride);
}

// Query heads of each KV group sequence `seq` uses (the first ones), clamped to the group: a last
// guard, the caller does not check.
inline int live_heads(const Problem& pb, int seq) {
  const int group = pb.num_q_heads / pb.num_kv_heads;
  const int live = pb.group_heads == nullptr ? group : pb.group_heads[seq];
  return live < 0 ? 0 : live > group ? group : live;
}

// The cache slots of the block holding context positions start .. start + count - 1 (count: up to
// a block, fewer at the context's end).
struct BlockSpan {
  int64_t first_slot;
  int count;
};

inline BlockSpan block_span(const int32_t* blocks, int start, int len, int block_size) {
  return {static_cast<int64_t>(blocks[start / block_size]) * block_size,
          len - start < block_size ? len - start : block_size};
}

// One task's view of the problem: a sequence, one of its KV heads and the `group` query heads
// that share it.  T: the query's element type; KV: the cache's (T, or int8_t).
template <typename T, typename KV>
struct Task {
  int len;                 // context length
  const int32_t* blocks;   // the sequence's block table
  int64_t row_stride;      // cache elements from one slot to the next
  const KV* keys;          // K rows of this head: keys + slot * row_stride
  const KV* values;        // V rows likewise
  const T* query;          // the group's query rows, head_step apart
  T* out;                  // the group's output rows, head_step apart
  int64_t head_step;       // head_dim, or num_kv_heads * head_dim in rank-major order
  int live;                // query heads of the group this sequence uses (the first ones)

  Task() = default;
  Task(const Problem& pb, int seq, int kv_head) {
    const int group = pb.num_q_heads / pb.num_kv_heads;
    len = pb.seq_lens[seq];
    live = live_heads(pb, seq);
    blocks = pb.block_tables + seq * pb.block_table_stride;
    row_stride = static_cast<int64_t>(pb.num_kv_heads) * pb.row_elems;
    keys = static_cast<const KV*>(pb.key_cache) + kv_head * pb.row_elems;
    values = static_cast<const KV*>(pb.value_cache) + kv_head * pb.row_elems;
    const int64_t first_head = pb.rank_major ? kv_head : static_cast<int64_t>(kv_head) * group;
    head_step = pb.rank_major ? static_cast<int64_t>(pb.num_kv_heads) * pb.head_dim : pb.head_dim;
    query = static_cast<const T*>(pb.query) + seq * pb.query_stride + first_head * pb.head_dim;
    out = static_cast<T*>(pb.out) + (static_cast<int64_t>(seq) * pb.num_q_heads + first_head) * pb.head_dim;
  }
};

// scores[g * capacity + p] <- q_g . K[p] (q already scaled), in block order: each K row is
// converted once and serves the whole group.  Returns each query head's maximum in max_score.
template <typename T, typename KV, int kVecs>
void score_keys(const Problem& pb, const Task<T, KV>& task, const float (*q)[kMaxHeadDim], float* scores,
                int64_t capacity, float* max_score) {
  const int group = task.live, vecs = kVecs > 0 ? kVecs : pb.head_dim / kLanes;
  for (int g = 0; g < group; g++) max_score[g] = -3.0e38f;
  for (int start = 0; start < task.len; start += pb.block_size) {
    const auto [first_slot, count] = block_span(task.blocks, start, task.len, pb.block_size);
    prefetch_ahead(task.keys, task.blocks, start, task.len, pb, task.row_stride);
    for (int i = 0; i < count; i++) {
      const KV* key = task.keys + (first_slot + i) * task.row_stride;
      const float key_scale = row_scale(key, pb.head_dim);
      Vec k[kMaxRowVecs];
      for (int v = 0; v < vecs; v++) k[v] = load(key + kLanes * v, pb.dtype);
      for (int g = 0; g < group; g++) {
        Vec dot[kSumVecs];
        for (int j = 0; j < kSumVecs; j++) dot[j] = load(q[g] + kLanes * j, kFloat32) * k[j];
        for (int v = kSumVecs; v < vecs; v += kSumVecs)
          for (int j = 0; j < kSumVecs; j++) dot[j] = fmadd(load(q[g] + kLanes * (v + j), kFloat32), k[v + j], dot[j]);
        float s = reduce_add(dot);  // the same bits in every build
        if constexpr (std::is_same_v<KV, int8_t>) s *= key_scale;
        scores[g * capacity + start + i] = s;
        max_score[g] = s > max_score[g] ? s : max_score[g];
      }
    }
  }
}

// Query heads per pass of sum_values, by head_dim.  With AVX-512 their accumulators and the
// converted V row stay in registers (3 x 4 + 4 of the 32 zmm registers at head_dim 64).  AVX2's 16
// ymm registers hold less and some accumulators spill to L1, which still costs less than another
// pass over V: 64 sequences x ~512 tokens, head_dim 64, one thread, ms a layer: 1 head a pass 4.6,
// 2 heads 3.9, 3 heads 3.6; head_dim 128 (groups of 4): 1 head 13.6, 2 heads 12.4.
template <int kVecs>
constexpr int heads_per_pass() {
  return kVecs * kLanes == 64 ? 3 : kVecs * kLanes == 128 ? 2 : 1;
}

// A pass over V's rows keeps kHeads heads' accumulators and the converted row in vector registers
// when they fit (AVX-512's 32; AVX2 has 16, and at head_dim 64 three heads' accumulators alone
// take 24).  Where they fit, the pass is compiled for its exact head count (with_head_count): with
// a count known only at run time GCC kept the accumulators on the stack, a store and a load around
// every multiply-add (perf annotate), and three heads a group summed V ~1.15x slower (AVX-512, 16
// and 32 sequences x 256 tokens).  Where they do not fit, spills are certain either way, and the
// run-time count measured faster (AVX2: the exact count 0.87x).
constexpr int kVecRegisters = kLanes == 16 ? 32 : 16;

template <int kHeads, int kVecs>
constexpr bool accumulators_fit() {
  return kVecs > 0 && (kHeads + 1) * kVecs <= kVecRegisters;
}

// Calls run(std::integral_constant<int, heads>{}) for heads in 1 .. kMax.
template <int kMax, typename Run>
inline void with_head_count(int heads, Run&& run) {
  if (heads == kMax) return run(std::integral_constant<int, kMax>{});
  if constexpr (kMax > 1) with_head_count<kMax - 1>(heads, run);
}

// Calls pass(count, exact, heads) for `heads` (1 .. kMax) query heads, count and exact as
// std::integral_constants: count = heads and exact where the accumulators fit, else count = kMax
// and not exact (the pass takes the count at run time).
template <int kMax, int kVecs, typename Pass>
inline void run_pass(int heads, Pass&& pass) {
  if constexpr (accumulators_fit<kMax, kVecs>())
    with_head_count<kMax>(heads, [&](auto count) { pass(count, std::true_type{}, heads); });
  else
    pass(std::integral_constant<int, kMax>{}, std::false_type{}, heads);
}

// out_g <- inverse_sum[g] * sum_p weights[g][p] V[p] for the `heads` (<= kHeads; kExact: = kHeads)
// query heads from g0, in one pass over the context.  The first pass brings V in from memory;
// later ones hit the cache.
template <typename T, typename KV, int kVecs, int kHeads, bool kExact>
void sum_values_pass(const Problem& pb, const Task<T, KV>& task, const float* weights, int64_t capacity,
                     const float* inverse_sum, int g0, int heads) {
  constexpr int kRowVecs = kVecs > 0 ? kVecs : kMaxRowVecs;
  const int vecs = kVecs > 0 ? kVecs : pb.head_dim / kLanes, pass_heads = kExact ? kHeads : heads;
  Vec acc[kHeads][kRowVecs];
  for (int j = 0; j < kHeads; j++)
    for (int v = 0; v < vecs; v++) acc[j][v] = splat(0.0f);
  for (int start = 0; start < task.len; start += pb.block_size) {
    const auto [first_slot, count] = block_span(task.blocks, start, task.len, pb.block_size);
    if (g0 == 0) prefetch_ahead(task.values, task.blocks, start, task.len, pb, task.row_stride);
    for (int i = 0; i < count; i++) {
      const KV* value = task.values + (first_slot + i) * task.row_stride;
      const float value_scale = row_scale(value, pb.head_dim);
      Vec row[kRowVecs];
      for (int v = 0; v < vecs; v++) row[v] = load(value + kLanes * v, pb.dtype);
      for (int j = 0; j < kHeads; j++) {
        if (j >= pass_heads) break;
        float weight = weights[(g0 + j) * capacity + start + i];
        if constexpr (std::is_same_v<KV, int8_t>) weight *= value_scale;
        const Vec w = splat(weight);
        for (int v = 0; v < vecs; v++) acc[j][v] = fmadd(w, row[v], acc[j][v]);
      }
    }
  }
  for (int j = 0; j < pass_heads; j++)
    for (int v = 0; v < vecs; v++)
      store(task.out + (g0 + j) * task.head_step + kLanes * v, acc[j][v] * splat(inverse_sum[g0 + j]), pb.dtype);
}

// Every live query head's weighted sum of V, heads_per_pass heads a pass.
template <typename T, typename KV, int kVecs>
void sum_values(const Problem& pb, const Task<T, KV>& task, const float* weights, int64_t capacity,
                const float* inverse_sum) {
  constexpr int kHeads = heads_per_pass<kVecs>();
  for (int g0 = 0; g0 < task.live; g0 += kHeads)
    run_pass<kHeads, kVecs>(task.live - g0 < kHeads ? task.live - g0 : kHeads, [&](auto count, auto exact, int heads) {
      sum_values_pass<T, KV, kVecs, decltype(count)::value, decltype(exact)::value>(pb, task, weights, capacity,
                                                                                    inverse_sum, g0, heads);
    });
}

// One (sequence, KV head): scores, softmax, weighted sum.  scores holds group rows of `capacity`
// floats, capacity >= the sequence's length.  kVecs = head_dim / kLanes when known at compile time
// (the loops over a row unroll and K stays in registers: ~1.4x faster with AVX-512), 0 otherwise.
template <typename T, typename KV, int kVecs>
void attend_one(const Problem& pb, int seq, int kv_head, float* scores, int64_t capacity) {
  const Task<T, KV> task(pb, seq, kv_head);
  const int group = task.live, vecs = kVecs > 0 ? kVecs : pb.head_dim / kLanes;
  for (int g = group; g < pb.num_q_heads / pb.num_kv_heads; g++)  // heads the level drops
    std::memset(task.out + g * task.head_step, 0, pb.head_dim * sizeof(T));
  if (group == 0) return;
  alignas(64) float q[kMaxGroup][kMaxHeadDim];
  for (int g = 0; g < group; g++)
    for (int v = 0; v < vecs; v++)
      store(q[g] + kLanes * v, load(task.query + g * task.head_step + kLanes * v, pb.dtype) * splat(pb.scale), kFloat32);
  float max_score[kMaxGroup], inverse_sum[kMaxGroup];
  score_keys<T, KV, kVecs>(pb, task, q, scores, capacity, max_score);
  for (int g = 0; g < group; g++) inverse_sum[g] = 1.0f / exp_and_sum(scores + g * capacity, task.len, max_score[g]);
  sum_values<T, KV, kVecs>(pb, task, scores, capacity, inverse_sum);
}

// ---- One task per sequence: every KV head of it in one pass over each block ----
//
// A block's rows of all KV heads lie contiguous ([slot][kv_head][row]), so a pass over every head
// reads each block as one run (SmolLM2, bf16: 16 x 3 x 128 bytes = 6 KB), where a (sequence, KV
// head) task reads one row in num_kv_heads and leaves the rest of each line group to other tasks.
// Measured on the 2-core AMD EPYC against the per-head split, one layer, K/V from memory, one query
// head a group (level 40's rows), 16-64 sequences of ~256-1024 tokens: 1.11-1.29x faster over a
// bf16 cache, 1.28-1.42x over an int8 one (the AVX2 build 1.22-1.35x and 1.23-1.65x); K/V read at
// 20-29 GB/s, where two threads stream ~52 GB/s (benchmarks/cpu_decode_attention.py --baseline).
// At two heads a group it is a wash (0.86-1.11x), at three slower (the per-row arithmetic of nine
// heads then sets the pace), so rows at every head keep the per-head split.  Each head's arithmetic
// is attend_one's, in the same order: the same bits either way.

constexpr int kMaxSequenceKvHeads = 8;  // more KV heads: long rows already, and scratch grows

// Asks for part `part` of `parts` of a block's run (every KV head's rows) ahead of use: spread over
// the rows of the block before, so the requests leave at the pace rows are used (all at once they
// fill the core's miss queue and stall it; left to the hardware prefetchers, which do not cross
// into scattered blocks, the pass ran ~2x slower).  A prefetch past the cache's end cannot fault.
template <typename KV>
inline void prefetch_run_part(const KV* cache, int32_t block, const Problem& pb, int64_t row_stride, int part,
                              int parts) {
  const int64_t run_bytes = pb.block_size * row_stride * static_cast<int64_t>(sizeof(KV));
  const char* first = reinterpret_cast<const char*>(cache + static_cast<int64_t>(block) * pb.block_size * row_stride);
  const int64_t lines = (run_bytes + 63) / 64 + 1;  // +1: the run need not start on a line
  const char* line = reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(first) & ~uintptr_t{63});
  for (int64_t l = lines * part / parts; l < lines * (part + 1) / parts; l++)
    asm volatile("prefetcht1 %0" : : "m"(line[64 * l]));
}

template <typename KV>
inline void prefetch_run(const KV* cache, int32_t block, const Problem& pb, int64_t row_stride) {
  prefetch_run_part(cache, block, pb, row_stride, 0, 1);
}

// The blocks' runs at `start` + 1 and + 2 blocks: the first block's, whole, at the start; then,
// spread over the block at `start`'s rows, the run two blocks ahead.
template <typename KV>
inline void prefetch_runs_ahead(const KV* cache, const int32_t* blocks, int start, int row, int count, int len,
                                const Problem& pb, int64_t row_stride) {
  const int block = start / pb.block_size;
  if (start == 0 && row == 0 && pb.block_size < len) prefetch_run(cache, blocks[1], pb, row_stride);
  if (start + 2 * pb.block_size < len) prefetch_run_part(cache, blocks[block + 2], pb, row_stride, row, count);
}

// Per-thread scratch of a sequence task: the scaled queries and every head's scores.
struct SequenceScratch {
  float (*q)[kMaxHeadDim];
  float* scores;  // [num_q_heads][capacity]
};

template <typename T, typename KV, int kVecs>
void score_sequence_keys(const Problem& pb, const Task<T, KV>* tasks, const SequenceScratch& scratch,
                         int64_t capacity, float* max_score) {
  const int num_kv = pb.num_kv_heads, group = pb.num_q_heads / num_kv, live = tasks[0].live;
  const int vecs = kVecs > 0 ? kVecs : pb.head_dim / kLanes;
  const Task<T, KV>& first = tasks[0];
  float* __restrict scores = scratch.scores;
  float best[kMaxSequenceKvHeads * kMaxGroup];
  for (int j = 0; j < pb.num_q_heads; j++) best[j] = -3.0e38f;
  for (int start = 0; start < first.len; start += pb.block_size) {
    const auto [first_slot, count] = block_span(first.blocks, start, first.len, pb.block_size);
    for (int i = 0; i < count; i++) {
      prefetch_runs_ahead(first.keys, first.blocks, start, i, count, first.len, pb, first.row_stride);
      for (int h = 0; h < num_kv; h++) {
        const KV* key = tasks[h].keys + (first_slot + i) * first.row_stride;
        const float key_scale = row_scale(key, pb.head_dim);
        Vec k[kMaxRowVecs];
        for (int v = 0; v < vecs; v++) k[v] = load(key + kLanes * v, pb.dtype);
        for (int g = 0; g < live; g++) {
          const float* q = scratch.q[h * group + g];
          Vec dot[kSumVecs];
          for (int j = 0; j < kSumVecs; j++) dot[j] = load(q + kLanes * j, kFloat32) * k[j];
          for (int v = kSumVecs; v < vecs; v += kSumVecs)
            for (int j = 0; j < kSumVecs; j++) dot[j] = fmadd(load(q + kLanes * (v + j), kFloat32), k[v + j], dot[j]);
          float s = reduce_add(dot);  // attend_one's order
          if constexpr (std::is_same_v<KV, int8_t>) s *= key_scale;
          scores[(h * group + g) * capacity + start + i] = s;
          best[h * group + g] = s > best[h * group + g] ? s : best[h * group + g];
        }
      }
    }
  }
  for (int j = 0; j < pb.num_q_heads; j++) max_score[j] = best[j];
}

// Query heads per pass of a whole-sequence task: with AVX-512 at head_dim 64, six heads' accumulators
// and a converted row (6 x 4 + 4 zmm) still fit the 32 registers: two heads a group over three KV
// heads then take one pass (measured 0.86-1.11x of the per-head split, against 0.81-1.01x at three
// heads a pass).
template <int kVecs>
constexpr int sequence_heads_per_pass() {
  return kLanes == 16 && kVecs * kLanes == 64 ? 6 : heads_per_pass<kVecs>();
}

// One pass of sum_sequence_values over `heads` (<= kHeads; kExact: = kHeads, run_pass) query heads
// from flat index j0 ((KV head, query head) order).  kOneRow: every head of the pass reads one KV
// head's rows, each row converted once; otherwise each head converts its own row (an L1 hit when it
// is the last head's).
template <typename T, typename KV, int kVecs, bool kOneRow, int kHeads, bool kExact>
void sum_sequence_pass(const Problem& pb, const Task<T, KV>* tasks, const float* scores, int64_t capacity,
                       const float* inverse_sum, int j0, int heads, bool prefetch) {
  const int pass_heads = kExact ? kHeads : heads;
  constexpr int kRowVecs = kVecs > 0 ? kVecs : kMaxRowVecs;
  const int group = pb.num_q_heads / pb.num_kv_heads, live = tasks[0].live;
  const int vecs = kVecs > 0 ? kVecs : pb.head_dim / kLanes;
  const Task<T, KV>& first = tasks[0];
  int64_t score_row[kHeads];
  const KV* head_values[kHeads];
  for (int j = 0; j < pass_heads; j++) {
    const int h = (j0 + j) / live, g = (j0 + j) % live;
    score_row[j] = (h * group + g) * capacity;
    head_values[j] = tasks[h].values;
  }
  Vec acc[kHeads][kRowVecs];
  for (int j = 0; j < kHeads; j++)
    for (int v = 0; v < vecs; v++) acc[j][v] = splat(0.0f);
  for (int start = 0; start < first.len; start += pb.block_size) {
    const auto [first_slot, count] = block_span(first.blocks, start, first.len, pb.block_size);
    for (int i = 0; i < count; i++) {
      if (prefetch) prefetch_runs_ahead(first.values, first.blocks, start, i, count, first.len, pb, first.row_stride);
      const int64_t offset = (first_slot + i) * first.row_stride;
      Vec row[kRowVecs];
      float value_scale = 1.0f;
      if constexpr (kOneRow) {
        value_scale = row_scale(head_values[0] + offset, pb.head_dim);
        for (int v = 0; v < vecs; v++) row[v] = load(head_values[0] + offset + kLanes * v, pb.dtype);
      }
      for (int j = 0; j < kHeads; j++) {
        if (j >= pass_heads) break;
        if constexpr (!kOneRow) {
          value_scale = row_scale(head_values[j] + offset, pb.head_dim);
          for (int v = 0; v < vecs; v++) row[v] = load(head_values[j] + offset + kLanes * v, pb.dtype);
        }
        float weight = scores[score_row[j] + start + i];
        if constexpr (std::is_same_v<KV, int8_t>) weight *= value_scale;
        const Vec w = splat(weight);
        for (int v = 0; v < vecs; v++) acc[j][v] = fmadd(w, row[v], acc[j][v]);
      }
    }
  }
  for (int j = 0; j < pass_heads; j++) {
    const int h = (j0 + j) / live, g = (j0 + j) % live;
    T* out = tasks[h].out + g * tasks[h].head_step;
    const float scale = inverse_sum[h * group + g];
    for (int v = 0; v < vecs; v++) store(out + kLanes * v, acc[j][v] * splat(scale), pb.dtype);
  }
}

// Every live head's weighted sum of V, kHeads heads a pass in (KV head, query head) order, a pass
// never splitting a KV head's heads where they fit in one; the first pass brings the blocks' runs
// into L2 for the rest.
template <typename T, typename KV, int kVecs>
void sum_sequence_values(const Problem& pb, const Task<T, KV>* tasks, const float* scores, int64_t capacity,
                         const float* inverse_sum) {
  constexpr int kHeads = sequence_heads_per_pass<kVecs>();
  const int live = tasks[0].live, total = pb.num_kv_heads * live;
  const int per_pass = live >= kHeads ? kHeads : kHeads / live * live;
  for (int j0 = 0; j0 < total; j0 += per_pass) {
    const int heads = total - j0 < per_pass ? total - j0 : per_pass;
    const bool one_row = j0 / live == (j0 + heads - 1) / live;
    run_pass<kHeads, kVecs>(heads, [&](auto count, auto exact, int pass_heads) {
      constexpr int kCount = decltype(count)::value;
      constexpr bool kExact = decltype(exact)::value;
      if (one_row)
        sum_sequence_pass<T, KV, kVecs, true, kCount, kExact>(pb, tasks, scores, capacity, inverse_sum, j0, pass_heads,
                                                              j0 == 0);
      else
        sum_sequence_pass<T, KV, kVecs, false, kCount, kExact>(pb, tasks, scores, capacity, inverse_sum, j0, pass_heads,
                                                               j0 == 0);
    });
  }
}

// One sequence, every KV head: attend_one's steps over one pass per block.
template <typename T, typename KV, int kVecs>
void attend_sequence(const Problem& pb, int seq, const SequenceScratch& scratch, int64_t capacity) {
  const int num_kv = pb.num_kv_heads, group = pb.num_q_heads / num_kv;
  const int vecs = kVecs > 0 ? kVecs : pb.head_dim / kLanes;
  Task<T, KV> tasks[kMaxSequenceKvHeads] = {};
  for (int h = 0; h < num_kv; h++) tasks[h] = Task<T, KV>(pb, seq, h);
  const int live = tasks[0].live;
  for (int h = 0; h < num_kv; h++) {
    for (int g = live; g < group; g++)  // heads the level drops
      std::memset(tasks[h].out + g * tasks[h].head_step, 0, pb.head_dim * sizeof(T));
    for (int g = 0; g < live; g++)
      for (int v = 0; v < vecs; v++)
        store(scratch.q[h * group + g] + kLanes * v,
              load(tasks[h].query + g * tasks[h].head_step + kLanes * v, pb.dtype) * splat(pb.scale), kFloat32);
  }
  if (live == 0) return;
  float max_score[kMaxSequenceKvHeads * kMaxGroup], inverse_sum[kMaxSequenceKvHeads * kMaxGroup];
  score_sequence_keys<T, KV, kVecs>(pb, tasks, scratch, capacity, max_score);
  for (int h = 0; h < num_kv; h++)
    for (int g = 0; g < live; g++) {
      const int j = h * group + g;
      inverse_sum[j] = 1.0f / exp_and_sum(scratch.scores + j * capacity, tasks[h].len, max_score[j]);
    }
  sum_sequence_values<T, KV, kVecs>(pb, tasks, scratch.scores, capacity, inverse_sum);
}

// Whether sequence `seq` is one task (attend_sequence) or one per KV head (attend_one).  One task
// when its live heads fit one pass over V and the batch has enough sequences to keep every thread
// busy: with more heads a row's arithmetic, not the wait for it, sets the pace, and the per-head
// split does better (benchmarks/cpu_decode_attention.py).
bool attends_whole_sequence(const Problem& pb, int seq, int num_seqs, int num_threads, int sequence_heads) {
  if (pb.num_kv_heads > kMaxSequenceKvHeads || num_seqs < 4 * num_threads) return false;
  return live_heads(pb, seq) * pb.num_kv_heads <= sequence_heads;
}

template <typename T, typename KV, int kVecs>
void attend_all(const Problem& pb, int num_seqs, int num_threads) {
  int longest = 0;
  for (int s = 0; s < num_seqs; s++) longest = pb.seq_lens[s] > longest ? pb.seq_lens[s] : longest;
  const int64_t capacity = (longest + 15) / 16 * 16;
  // Tasks: (sequence, KV head), or (sequence, -1) for a whole sequence.
  struct Work { int seq, kv_head; };
  Work* tasks = static_cast<Work*>(std::malloc(sizeof(Work) * num_seqs * pb.num_kv_heads));
  int64_t num_tasks = 0;
  bool any_whole = false;
  for (int seq = 0; seq < num_seqs; seq++) {
    if (attends_whole_sequence(pb, seq, num_seqs, num_threads, sequence_heads_per_pass<kVecs>())) {
      tasks[num_tasks++] = {seq, -1};
      any_whole = true;
    } else {
      for (int h = 0; h < pb.num_kv_heads; h++) tasks[num_tasks++] = {seq, h};
    }
  }
  // Scores for one KV group's heads (attend_one), or for every head (attend_sequence, which also
  // keeps its scaled queries here).  Sizes are multiples of 64 bytes, as aligned_alloc requires.
  const int64_t scored_heads = any_whole ? pb.num_q_heads : pb.num_q_heads / pb.num_kv_heads;
#pragma omp parallel num_threads(num_threads)
  {
    const SequenceScratch scratch{
        any_whole ? static_cast<float(*)[kMaxHeadDim]>(std::aligned_alloc(64, sizeof(float) * kMaxHeadDim * pb.num_q_heads))
                  : nullptr,
        static_cast<float*>(std::aligned_alloc(64, sizeof(float) * scored_heads * capacity))};
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < num_tasks; task++) {
      const Work work = tasks[task];
      if (work.kv_head < 0)
        attend_sequence<T, KV, kVecs>(pb, work.seq, scratch, capacity);
      else
        attend_one<T, KV, kVecs>(pb, work.seq, work.kv_head, scratch.scores, capacity);
    }
    std::free(scratch.q);
    std::free(scratch.scores);
  }
  std::free(tasks);
}

template <typename T, typename KV>
void attend_all_dims(const Problem& pb, int num_seqs, int num_threads) {
  switch (pb.head_dim) {
    case 64: return attend_all<T, KV, 64 / kLanes>(pb, num_seqs, num_threads);
    case 128: return attend_all<T, KV, 128 / kLanes>(pb, num_seqs, num_threads);
    default: return attend_all<T, KV, 0>(pb, num_seqs, num_threads);
  }
}

}  // namespace

extern "C" {

int engine_cpu_kernels_available(void) { return 1; }

// The build this library is ("avx512_bf16", "avx512" or "avx2"): what its compiler flags enabled.
const char* engine_cpu_kernel_isa(void) { return ENGINE_CPU_ISA; }

// Returns 0 on success, -1 for shapes or dtypes the kernel does not handle (the caller checks
// first; this is a last guard against reading out of bounds).
// group_heads: nullptr, or [num_seqs] query heads per KV group each sequence uses (the first
// ones of each group; each in 0 .. num_q_heads / num_kv_heads).  rank_major: 0 grouped heads,
// 1 rank-major slots (the layout at the top).  kv_int8: 0 the cache holds the query's dtype, 1
// int8 rows with their scales.
int paged_decode_attention(const void* query, int64_t query_stride, const void* key_cache, const void* value_cache,
                           const int32_t* block_tables, int64_t block_table_stride, const int32_t* seq_lens,
                           const int32_t* group_heads, void* out, int num_seqs, int num_q_heads, int num_kv_heads, int head_dim,
                           int block_size, float scale, int dtype, int num_threads, int rank_major, int kv_int8) {
  if (num_kv_heads <= 0 || num_q_heads % num_kv_heads != 0 || num_q_heads / num_kv_heads > kMaxGroup ||
      head_dim % 16 != 0 || head_dim > kMaxHeadDim || head_dim <= 0 || block_size <= 0)
    return -1;
  return with_storage_type(dtype, [&](auto element, DType type) {
    const int64_t row_elems = kv_int8 != 0 ? head_dim + kKvScaleBytes : head_dim;
    const Problem pb{query, query_stride, key_cache, value_cache, block_tables, block_table_stride, seq_lens,
                     group_heads, out,
                     num_q_heads, num_kv_heads, head_dim, block_size, rank_major != 0, scale, type, row_elems};
    using T = decltype(element);
    if (kv_int8 != 0)
      attend_all_dims<T, int8_t>(pb, num_seqs, num_threads);
    else
      attend_all_dims<T, T>(pb, num_seqs, num_threads);
  });
}

}  // extern "C"

#else  // no AVX2 build flags: the engine keeps its torch path

extern "C" int engine_cpu_kernels_available(void) { return 0; }
extern "C" const char* engine_cpu_kernel_isa(void) { return ""; }

#endif
