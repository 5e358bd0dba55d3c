"""Time the quantized linear kernel (engine/kernels/cpu/quantized_linear.cpp) against torch's
F.linear on the dequantized weight, bf16 and fp32, for SmolLM2-135M's projections.

Activations are bf16 for the kernel and torch-bf16, fp32 for torch-fp32.  Each path cycles
through enough copies of its weight to span 2x the L3 cache, so that every call reads its weight
from memory as a decode step does (the model's weights, ~96 MB as Q4_1, do not fit in L3); --hot
times one copy instead, from the caches.  Prints ms per call and, at M=1, the rate at which each
path reads its weight (weight bytes / time; a call's fixed ~8 us, Python and OpenMP, included).

    .venv/bin/python benchmarks/quantized_linear.py
    ELASTIC_ENGINE_CPU_ISA=avx2 .venv/bin/python benchmarks/quantized_linear.py   # torch capped too
    .venv/bin/python benchmarks/quantized_linear.py --isa avx2   # only the kernel's build

The machine is shared (2 cores): each figure is the median of many calls, and --threads 1 runs
are steadier than two threads, one of which others may deschedule.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time
from collections.abc import Callable

import engine  # noqa: F401  (before torch: engine.process_env caps torch to ELASTIC_ENGINE_CPU_ISA)

# isort: split
import torch
import torch.nn.functional as F

from engine.kernels.cpu import native_library
from engine.kernels.cpu.quantized_linear import quantized_linear, vector_lanes
from engine.kernels.cpu.quantized_weights import QuantFormat, QuantizedWeight, dequantize, quantize

# (name, out_features, in_features, formats)
SHAPES = [
    ("qkv", 960, 576, (QuantFormat.Q4_0, QuantFormat.Q4_1, QuantFormat.Q8_0)),
    ("o_proj", 576, 576, (QuantFormat.Q4_0, QuantFormat.Q4_1, QuantFormat.Q8_0)),
    ("gate_up", 3072, 576, (QuantFormat.Q4_0, QuantFormat.Q4_1, QuantFormat.Q8_0)),
    ("down", 576, 1536, (QuantFormat.Q4_0, QuantFormat.Q4_1, QuantFormat.Q8_0)),
    ("lm_head", 49152, 576, (QuantFormat.Q8_0,)),
]
COLUMNS = ["Q4_0", "Q4_1", "Q8_0", "torch bf16", "torch fp32"]
CACHE_SPAN_BYTES = 64 << 20  # 2x this machine's 32 MiB L3


def copies_of(tensor: torch.Tensor, hot: bool) -> int:
    """Copies of a weight to cycle through: one when hot, else enough to span CACHE_SPAN_BYTES."""
    return 1 if hot else max(1, -(-CACHE_SPAN_BYTES // (tensor.numel() * tensor.element_size())))


def time_ms(calls: list[Callable[[], object]], min_seconds: float) -> float:
    """Median ms of one call, over passes through `calls` (after a warm-up pass): the median, as
    others share the cores, and a call whose second thread was descheduled takes a time slice."""
    for call in calls:
        call()
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < max(len(calls), 5) or time.perf_counter() - start < min_seconds:
        for call in calls:
            begin = time.perf_counter()
            call()
            samples.append(time.perf_counter() - begin)
    return statistics.median(samples) * 1e3


def kernel_calls(weight: QuantizedWeight, x: torch.Tensor, library: ctypes.CDLL,
                 hot: bool) -> list[Callable[[], object]]:
    weights = [QuantizedWeight(weight.blocks.clone(), weight.format) for _ in range(copies_of(weight.blocks, hot))]
    out = torch.empty(x.shape[0], weight.out_features, dtype=x.dtype)
    return [lambda w=w: quantized_linear(x, w, out=out, library=library) for w in weights]


def torch_calls(weight: torch.Tensor, x: torch.Tensor, hot: bool) -> list[Callable[[], object]]:
    weights = [weight.clone() for _ in range(copies_of(weight, hot))]
    return [lambda w=w: F.linear(x, w) for w in weights]


def bench_shape(name: str, n: int, k: int, formats: tuple[QuantFormat, ...], batch_sizes: list[int],
                min_seconds: float, library: ctypes.CDLL, hot: bool) -> None:
    quantized = {fmt: quantize(torch.randn(n, k) * 0.02, fmt) for fmt in formats}
    reference = dequantize(quantized[formats[-1]])
    for m in batch_sizes:
        x = torch.randn(m, k)
        ms = {fmt.name: time_ms(kernel_calls(w, x.bfloat16(), library, hot), min_seconds)
              for fmt, w in quantized.items()}
        ms["torch bf16"] = time_ms(torch_calls(reference.bfloat16(), x.bfloat16(), hot), min_seconds)
        ms["torch fp32"] = time_ms(torch_calls(reference, x, hot), min_seconds)
        cells = [f"{ms[c]:>10.3f}" if c in ms else f"{'-':>10}" for c in COLUMNS]
        line = f"{name:>8} {n:>6}x{k:<5} {m:>4} " + " ".join(cells)
        if m == 1:
            rates = [weight_bytes(c, n, k) / ms[c] / 1e6 if c in ms else None for c in COLUMNS]
            line += "   GB/s " + " ".join(f"{r:>5.1f}" if r else f"{'-':>5}" for r in rates)
        print(line, flush=True)


def weight_bytes(column: str, n: int, k: int) -> float:
    if column in QuantFormat.__members__:
        return n * k / 32 * QuantFormat[column].block_bytes
    return n * k * (2 if column == "torch bf16" else 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", default="1,4,16,32,64,256")
    parser.add_argument("--shapes", default=",".join(s[0] for s in SHAPES))
    parser.add_argument("--isa", choices=list(native_library.ISA_FLAGS),
                        help="the build to run (default: the engine's)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads first (default: torch's)")
    parser.add_argument("--hot", action="store_true", help="one copy of each weight: read from the caches")
    parser.add_argument("--min-seconds", type=float, default=0.05, help="per measurement")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    library = native_library.load(args.isa)
    if library is None:
        print("this build of the native CPU kernels is not available here (see the log): nothing to time")
        return
    isa = args.isa or native_library.active_isa()
    print(f"{isa} build ({vector_lanes(library)} fp32 lanes), {torch.get_num_threads()} threads, bf16 activations "
          f"(fp32 for torch fp32); ms per call, weights {'from the caches' if args.hot else 'from memory'}")
    print(f"{'':>8} {'N x K':>12} {'M':>4} " + " ".join(f"{c:>10}" for c in COLUMNS))
    batch_sizes = [int(m) for m in args.batch_sizes.split(",")]
    for name, n, k, formats in SHAPES:
        if name in args.shapes.split(","):
            bench_shape(name, n, k, formats, batch_sizes, args.min_seconds, library, args.hot)


if __name__ == "__main__":
    main()
