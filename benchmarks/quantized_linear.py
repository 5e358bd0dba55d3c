"""Time the quantized linears against torch's dense GEMMs at SmolLM2-135M's projections, in one
run, as ratios:

    q8      quantized_linear_q8.cpp: x rounded to Q8 blocks, integer block dot products
            (VNNI where the probe reports it, under the mask), the weight's panels packed once
            as the engine packs them at load
    exact   quantized_linear.cpp: blocks dequantized in registers, fp32 FMAs (the reference path)
    fp32    F.linear on the dequantized fp32 weight (MKL)
    bf16    the bf16 weight, prepacked for oneDNN where the engine would prepack it (the probe
            says oneDNN can), else F.linear

Each shape uses the model's own block format (Q4_1 projections, the Q8_0 tied embedding as LM
head; --formats all for Q4_0/Q4_1/Q8_0 each).  The quantized kernels get the dtype the engine
would run (--dtype auto: bf16 where the CPU has bf16 dot products, else fp32), fp32 and bf16
their own.  The paths are timed interleaved: --rounds rounds, each timing every path in turn
(the median of its calls), and each figure is the median over rounds; so a slow spell of the
shared machine hits all paths alike, and the ratios are what to read.  Each path cycles through
enough copies of its weight to span 64 MiB, so that calls read weights from memory as a decode
step does; --hot times one copy, from the caches.

    .venv/bin/python benchmarks/quantized_linear.py
    ELASTIC_ENGINE_CPU_ISA=avx2 .venv/bin/python benchmarks/quantized_linear.py   # torch, MKL capped too
    .venv/bin/python benchmarks/quantized_linear.py --isa avx2   # only the kernels' build
    .venv/bin/python benchmarks/quantized_linear.py --baseline-library OLD.so   # a kernel change's A/B

--baseline-library adds a "q8 base" path: the same kernel from another build of the library (say
the previous commit's, from the kernel cache), its panels packed by that build, for a change's
ratio measured in the same run.
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

from engine.capabilities import cpu_features
from engine.kernels.cpu import native_library
from engine.kernels.cpu.quantized_linear import quantized_linear
from engine.kernels.cpu.quantized_linear_q8 import pack_panels, quantized_linear_q8, vnni_available
from engine.kernels.cpu.quantized_weights import QuantFormat, QuantizedWeight, dequantize, quantize
from engine.model.compute_plan import resolve_dtype
from peers.machine import machine, machine_lines

# (name, out_features, in_features, the model's format)
SHAPES = [
    ("qkv", 960, 576, QuantFormat.Q4_1),
    ("o_proj", 576, 576, QuantFormat.Q4_1),
    ("gate_up", 3072, 576, QuantFormat.Q4_1),
    ("down", 576, 1536, QuantFormat.Q4_1),
    ("lm_head", 49152, 576, QuantFormat.Q8_0),
]
PATHS = ["q8", "exact", "fp32", "bf16"]
CACHE_SPAN_BYTES = 64 << 20

Call = Callable[[], object]


def copies(tensor: torch.Tensor, hot: bool) -> int:
    """Copies of a weight to cycle through: one when hot, else enough to span CACHE_SPAN_BYTES."""
    return 1 if hot else max(1, -(-CACHE_SPAN_BYTES // (tensor.numel() * tensor.element_size())))


def time_interleaved(paths: dict[str, list[Call]], rounds: int, min_seconds: float) -> dict[str, float]:
    """ms per call of each path: the median over rounds of each round's median, the paths taking
    turns within every round (after one warm-up pass each)."""
    for calls in paths.values():
        for call in calls:
            call()
    per_round: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(rounds):
        for name, calls in paths.items():
            samples: list[float] = []
            start = time.perf_counter()
            while len(samples) < max(len(calls), 5) or time.perf_counter() - start < min_seconds:
                for call in calls:
                    begin = time.perf_counter()
                    call()
                    samples.append(time.perf_counter() - begin)
            per_round[name].append(statistics.median(samples))
    return {name: statistics.median(times) * 1e3 for name, times in per_round.items()}


def quantized_calls(kernel: Callable[..., torch.Tensor], weight: QuantizedWeight, x: torch.Tensor,
                    hot: bool, pack: Callable[[QuantizedWeight], QuantizedWeight] = lambda w: w,
                    **options: object) -> list[Call]:
    weights = [pack(QuantizedWeight(weight.blocks.clone(), weight.format)) for _ in range(copies(weight.blocks, hot))]
    out = torch.empty(x.shape[0], weight.out_features, dtype=x.dtype)
    return [lambda w=w: kernel(x, w, out=out, **options) for w in weights]


def dense_calls(weight: torch.Tensor, x: torch.Tensor, hot: bool, prepack: bool) -> list[Call]:
    weights = [weight.clone() for _ in range(copies(weight, hot))]
    if prepack:
        packed = [torch.ops.mkldnn._reorder_linear_weight(w, None) for w in weights]
        return [lambda w=w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "") for w in packed]
    return [lambda w=w: F.linear(x, w) for w in weights]


def bench(weight: QuantizedWeight, m: int, args: argparse.Namespace, library: ctypes.CDLL,
          baseline: ctypes.CDLL | None, dtype: torch.dtype) -> dict[str, float]:
    dense = dequantize(weight)
    x = torch.randn(m, weight.in_features)
    x[:, 7] *= 20  # an outlier channel, as real activations have (costs nothing; kept for realism)
    paths = {
        "q8": quantized_calls(quantized_linear_q8, weight, x.to(dtype), args.hot,
                              pack=lambda w: pack_panels(w, library=library), library=library,
                              vnni=vnni_available(library) and not args.no_vnni),
        "exact": quantized_calls(quantized_linear, weight, x.to(dtype), args.hot, library=library),
        "fp32": dense_calls(dense, x, args.hot, prepack=False),
        "bf16": dense_calls(dense.bfloat16(), x.bfloat16(), args.hot, prepack=cpu_features().can_prepack_bf16),
    }
    if baseline is not None:
        paths["q8 base"] = quantized_calls(quantized_linear_q8, weight, x.to(dtype), args.hot,
                                           pack=lambda w: pack_panels(w, library=baseline), library=baseline,
                                           vnni=vnni_available(baseline) and not args.no_vnni)
    return time_interleaved(paths, args.rounds, args.min_seconds)


def row(name: str, weight: QuantizedWeight, m: int, ms: dict[str, float]) -> str:
    times = " | ".join(f"{ms[p]:.3f}" for p in ms)
    ratios = " | ".join(f"{ms[p] / ms['q8']:.2f}" for p in list(ms)[1:])
    return (f"| {name} {weight.out_features}x{weight.in_features} {weight.format.name} | {m} | {times} | "
            f"{ratios} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", default="1,4,16,32,64")
    parser.add_argument("--shapes", default=",".join(s[0] for s in SHAPES))
    parser.add_argument("--formats", choices=["model", "all"], default="model")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                        help="of the quantized kernels' activations (auto: the engine's pick)")
    parser.add_argument("--isa", choices=list(native_library.ISA_FLAGS), help="the kernels' build (default: the engine's)")
    parser.add_argument("--no-vnni", action="store_true", help="the q8 kernel without VNNI even where the CPU has it")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads first (default: torch's)")
    parser.add_argument("--hot", action="store_true", help="one copy of each weight: read from the caches")
    parser.add_argument("--baseline-library", help="another build's .so: time its q8 kernel too")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--min-seconds", type=float, default=0.02, help="per path and round")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    library = native_library.load(args.isa)
    if library is None:
        print("this build of the native CPU kernels is not available here (see the log): nothing to time")
        return
    baseline = native_library.open_file(args.baseline_library) if args.baseline_library else None
    paths = PATHS + (["q8 base"] if baseline is not None else [])
    dtype = getattr(torch, resolve_dtype(args.dtype, "cpu")[0])
    vnni = vnni_available(library) and not args.no_vnni
    for line in machine_lines(machine()):
        print(line)
    print(f"kernels: {args.isa or native_library.active_isa()} build{' with VNNI' if vnni else ''}, "
          f"{torch.get_num_threads()} threads; q8/exact activations {str(dtype).removeprefix('torch.')}; "
          f"bf16 {'prepacked' if cpu_features().can_prepack_bf16 else 'F.linear'}; weights "
          f"{'from the caches' if args.hot else 'from memory'}; ms per call (median of {args.rounds} rounds)\n")
    print("| shape | M | " + " | ".join(f"{p} ms" for p in paths) + " | " +
          " | ".join(f"{p} / q8" for p in paths[1:]) + " |")
    print("|---" * (2 + 2 * len(paths) - 1) + "|")
    for name, n, k, model_format in SHAPES:
        if name not in args.shapes.split(","):
            continue
        for fmt in [model_format] if args.formats == "model" else list(QuantFormat):
            weight = quantize(torch.randn(n, k) * 0.02, fmt)
            for m in [int(m) for m in args.batch_sizes.split(",")]:
                print(row(name, weight, m, bench(weight, m, args, library, baseline, dtype)), flush=True)


if __name__ == "__main__":
    main()
