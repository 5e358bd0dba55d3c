"""Time one layer's decode attention on CPU: the C++ kernel against the torch path it replaces.

SmolLM2-135M's shapes (9 query heads, 3 KV heads, head_dim 64, 16-token blocks, 30 layers), bf16.
Each timed call is the next layer's, over that layer's own cache, as in a forward: a step's K/V
comes from memory, not from the last call's cache lines.  Blocks are scattered over each cache as a
busy engine leaves them, contexts drawn around each mean (+-50%) as ShareGPT's are ragged.  Prints
a row per build of the kernel (avx512_bf16, avx512, avx2: by default every one this CPU runs) with
each path's mean time per layer, the speed-up, and the kernel's K/V read rate (the contexts' bytes
over its time).  The kernel is also timed over the same values as an int8 cache
(`--kv-cache-dtype int8`: engine/kernels/kv_cache_format.py), its ratio to the bf16 cache beside.
`--heads-per-group 1` attends with one query head of each KV group, as an elastic level's rows do.
`--baseline FILE` times another build of the library beside each build (e.g. one an earlier commit
compiled, kept from ~/.cache/elastic-engine/kernels/), the two taking turns, and prints the ratio.

    .venv/bin/python benchmarks/cpu_decode_attention.py [--isa avx2,avx512] [--heads-per-group 1]
    .venv/bin/python benchmarks/cpu_decode_attention.py --isa avx512_bf16 --baseline /tmp/before.so
"""

from __future__ import annotations

import argparse
import ctypes
import time

import torch

from engine.capabilities import cpu_features
from engine.kernels.cpu import native_library
from engine.kernels.cpu.paged_decode_attention import paged_decode_attention
from engine.kernels.kv_cache_format import quantize_rows
from engine.model.attention_backends.metadata import AttentionMetadata
from engine.model.attention_backends.torch_backend import TorchAttentionBackend

NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, NUM_LAYERS = 9, 3, 64, 16, 30


def time_ms(fn, repeats: int) -> float:
    """Mean ms of fn(layer) over `repeats` passes through every layer, after one warm-up pass."""
    for layer in range(NUM_LAYERS):
        fn(layer)
    start = time.perf_counter()
    for _ in range(repeats):
        for layer in range(NUM_LAYERS):
            fn(layer)
    return (time.perf_counter() - start) / (repeats * NUM_LAYERS) * 1e3


def alternating_ms(fns: list, repeats: int, turns: int = 3) -> list[float]:
    """Each fn's best time_ms over `turns` turns taken in alternation: a slow minute of this VM lands
    on every fn alike."""
    best = [float("inf")] * len(fns)
    for _ in range(turns):
        for i, fn in enumerate(fns):
            best[i] = min(best[i], time_ms(fn, repeats))
    return best


def case(num_seqs: int, mean_context: int, repeats: int, libraries: dict[str, ctypes.CDLL],
         heads_per_group: int, baseline: ctypes.CDLL | None = None
         ) -> tuple[float, dict[str, tuple[float, float, float, float | None, float | None]]]:
    """The torch path's ms, and each build's (ms, K/V GB/s, ms over the int8 cache, and the
    baseline library's ms over each cache, taking turns with the build), on one batch."""
    generator = torch.Generator().manual_seed(num_seqs * 10_000 + mean_context)
    seq_lens = torch.randint(mean_context // 2, mean_context * 3 // 2 + 1, (num_seqs,), generator=generator,
                             dtype=torch.int32)
    blocks_per_seq = -(-int(seq_lens.max()) // BLOCK_SIZE)
    num_blocks = num_seqs * blocks_per_seq * 5 // 4  # a quarter of each cache holds other requests' blocks
    block_tables = torch.randperm(num_blocks, generator=generator)[: num_seqs * blocks_per_seq]
    block_tables = block_tables.view(num_seqs, blocks_per_seq).int()
    kv_caches = [torch.randn(2, num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, generator=generator).bfloat16()
                 for _ in range(NUM_LAYERS)]
    int8_caches = [quantize_rows(cache) for cache in kv_caches]
    query = torch.randn(num_seqs, NUM_Q_HEADS, HEAD_DIM, dtype=torch.bfloat16)
    group_heads = torch.full((num_seqs,), heads_per_group, dtype=torch.int32)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(0, dtype=torch.int64), query_start_loc=torch.arange(num_seqs + 1, dtype=torch.int32),
        seq_lens=seq_lens, block_tables=block_tables, num_decodes=num_seqs, max_query_len=1,
        max_seq_len=int(seq_lens.max()), block_size=BLOCK_SIZE,
        query_start_loc_cpu=list(range(num_seqs + 1)), seq_lens_cpu=seq_lens.tolist())
    torch_path = TorchAttentionBackend()
    # meta.scratch keeps the torch path's buckets and buffers across layers, as within one step
    torch_ms = time_ms(lambda layer: torch_path._decode(query, kv_caches[layer], meta), repeats)
    out = torch.empty_like(query)
    context_bytes = int(seq_lens.sum()) * 2 * NUM_KV_HEADS * HEAD_DIM * query.element_size()
    native = {}
    for isa, library in libraries.items():
        def attend(caches, library=library):
            return lambda layer: paged_decode_attention(query, caches[layer], block_tables, seq_lens, out,
                                                        group_heads=group_heads, library=library)
        if baseline is None:
            native_ms, int8_ms = time_ms(attend(kv_caches), repeats), time_ms(attend(int8_caches), repeats)
            base_ms = base_int8_ms = None
        else:
            native_ms, base_ms, int8_ms, base_int8_ms = alternating_ms(
                [attend(kv_caches), attend(kv_caches, baseline), attend(int8_caches), attend(int8_caches, baseline)],
                repeats)
        native[isa] = native_ms, context_bytes / native_ms / 1e6, int8_ms, base_ms, base_int8_ms
    return torch_ms, native


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="8,32,64")
    parser.add_argument("--contexts", default="128,512,1024")
    parser.add_argument("--repeats", type=int, default=5, help="passes through the 30 layers")
    parser.add_argument("--heads-per-group", type=int, default=NUM_Q_HEADS // NUM_KV_HEADS,
                        help="query heads of each KV group the kernel attends with (the torch path: all)")
    parser.add_argument("--isa", default=",".join(cpu_features().kernel_isas),
                        help=f"builds to time, comma-separated, of {', '.join(native_library.ISA_FLAGS)} "
                             "(default: every one this CPU runs)")
    parser.add_argument("--baseline", default=None,
                        help="another build of the library (a .so file) to time beside each build, taking turns")
    args = parser.parse_args()
    baseline = native_library.open_file(args.baseline) if args.baseline else None
    libraries = {isa: native_library.load(isa) for isa in args.isa.split(",") if isa}
    missing = [isa for isa, library in libraries.items() if library is None]
    if missing:
        print(f"skipping builds not available here (CPU, compiler: see the log): {', '.join(missing)}")
    libraries = {isa: library for isa, library in libraries.items() if library is not None}
    if not libraries:
        print("no build of the native CPU kernels is available here: nothing to time")
        return
    print(f"one layer, bf16, {NUM_Q_HEADS}/{NUM_KV_HEADS} heads x {HEAD_DIM}, {torch.get_num_threads()} threads")
    print(f"native: {args.heads_per_group} query head(s) of each KV group")
    if baseline is not None:
        print(f"baseline: {args.baseline} (its own build: {baseline.engine_cpu_kernel_isa().decode()})")
    print(f"{'seqs':>5} {'context':>8} {'build':>12} {'torch ms':>9} {'native ms':>10} {'speed-up':>9} {'K/V GB/s':>9}"
          f" {'int8 ms':>8} {'bf16/int8':>9}" + (f" {'base/bf16':>9} {'base/int8':>9}" if baseline else ""))
    for num_seqs in map(int, args.batches.split(",")):
        for context in map(int, args.contexts.split(",")):
            torch_ms, native = case(num_seqs, context, args.repeats, libraries, args.heads_per_group, baseline)
            for isa, (native_ms, rate, int8_ms, base_ms, base_int8_ms) in native.items():
                versus = "" if baseline is None else f" {base_ms / native_ms:>8.2f}x {base_int8_ms / int8_ms:>8.2f}x"
                print(f"{num_seqs:>5} {context:>8} {isa:>12} {torch_ms:>9.3f} {native_ms:>10.3f} "
                      f"{torch_ms / native_ms:>8.2f}x {rate:>9.1f} {int8_ms:>8.3f} {native_ms / int8_ms:>8.2f}x" + versus)


if __name__ == "__main__":
    main()
