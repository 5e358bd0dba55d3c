"""Time each Triton kernel in engine/kernels/ against its torch reference on a CUDA GPU.

Shapes are SmolLM2-135M's (hidden 576, 9 heads, 3 KV heads, head_dim 64, ffn 1536) and a
Llama-3-8B-like model's (hidden 4096, 32 heads, 8 KV heads, head_dim 128, ffn 14336), bf16.
For each case it prints both times (triton.testing.do_bench, mean ms), the speedup, and the
kernel's achieved memory bandwidth and FLOP/s as fractions of the device's peak: the minimum
bytes the kernel must move and the FLOPs it must do, divided by its time.

    .venv/bin/python benchmarks/kernels.py
    .venv/bin/python benchmarks/kernels.py --model smollm2-135m --peak-bw-gbs 3350 --peak-tflops 989

Without a CUDA GPU it says so and exits 0 (the kernels are tested on CPU in the interpreter).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

# (substring of torch.cuda.get_device_name(), peak memory GB/s, peak dense bf16 tensor TFLOP/s),
# from the vendors' data sheets; the first match wins, so specific names come first.
DEVICE_PEAKS: list[tuple[str, float, float]] = [
    ("H200", 4800.0, 989.0),
    ("H100 NVL", 3900.0, 835.0),
    ("H100 PCIe", 2000.0, 756.0),
    ("H100", 3350.0, 989.0),  # SXM
    ("GH200", 4000.0, 989.0),
    ("A100-SXM4-80GB", 2039.0, 312.0),
    ("A100 80GB PCIe", 1935.0, 312.0),
    ("A100", 1555.0, 312.0),  # 40 GB
    ("L40S", 864.0, 362.0),
    ("L40", 864.0, 181.0),
    ("L4", 300.0, 121.0),
    ("A10G", 600.0, 70.0),
    ("A10", 600.0, 125.0),
    ("RTX 4090", 1008.0, 165.0),
    ("RTX 3090", 936.0, 71.0),
    ("T4", 320.0, 65.0),  # fp16; no bf16 tensor cores
]


@dataclass(frozen=True)
class ModelShape:
    name: str
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int


MODELS = {
    "smollm2-135m": ModelShape("SmolLM2-135M", 576, 9, 3, 64, 1536),
    "llama-8b": ModelShape("Llama-8B", 4096, 32, 8, 128, 14336),
}
BLOCK_SIZE = 16
DEVICE = "cuda"  # a module constant so a CPU dry run (under TRITON_INTERPRET) can swap it


@dataclass
class Case:
    """One kernel on one shape: both implementations, and the work a perfect kernel would do."""

    kernel: str
    shape: str
    run_triton: Callable[[], object]
    run_torch: Callable[[], object]
    num_bytes: float
    num_flops: float


def main() -> int:
    args = parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/kernels.py needs a CUDA GPU (none found); the kernels' correctness tests run "
              "on CPU: TRITON_INTERPRET=1 pytest tests/kernels")
        return 0
    device_name = torch.cuda.get_device_name()
    peak_bw_gbs, peak_tflops = device_peaks(device_name, args.peak_bw_gbs, args.peak_tflops)
    print(f"device: {device_name}  peak: {peak_bw_gbs:.0f} GB/s, {peak_tflops:.0f} TFLOP/s (bf16 dense)")
    import triton.testing

    dtype = getattr(torch, args.dtype)
    models = list(MODELS.values()) if args.model == "all" else [MODELS[args.model]]
    rows = []
    for model in models:
        for case in make_cases(model, dtype):
            triton_ms = triton.testing.do_bench(case.run_triton)
            torch_ms = triton.testing.do_bench(case.run_torch)
            bandwidth_gbs = case.num_bytes / triton_ms / 1e6
            tflops = case.num_flops / triton_ms / 1e9
            rows.append((f"{model.name} {case.kernel}", case.shape, f"{triton_ms:.4f}", f"{torch_ms:.4f}",
                         f"{torch_ms / triton_ms:.2f}x", f"{bandwidth_gbs:.0f} ({bandwidth_gbs / peak_bw_gbs:.0%})",
                         f"{tflops:.1f} ({tflops / peak_tflops:.0%})"))
    print_table(("kernel", "shape", "triton ms", "torch ms", "speedup", "GB/s (peak)", "TFLOP/s (peak)"), rows)
    return 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=[*MODELS, "all"], default="all")
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    parser.add_argument("--peak-bw-gbs", type=float, default=None, help="override the device's peak GB/s")
    parser.add_argument("--peak-tflops", type=float, default=None, help="override the device's peak TFLOP/s")
    return parser.parse_args()


def device_peaks(device_name: str, bw_override: float | None, tflops_override: float | None) -> tuple[float, float]:
    bw, tflops = next(((bw, tf) for key, bw, tf in DEVICE_PEAKS if key in device_name), (None, None))
    bw = bw_override or bw
    tflops = tflops_override or tflops
    if bw is None or tflops is None:
        sys.exit(f"no peak figures known for {device_name!r}: pass --peak-bw-gbs and --peak-tflops")
    return bw, tflops


def make_cases(model: ModelShape, dtype: torch.dtype) -> list[Case]:
    return [
        *attention_cases(model, dtype),
        *norm_and_rotary_cases(model, dtype),
        *gemv_cases(model, dtype),
        *elastic_gemm_cases(model, dtype),
    ]


def paged_cache(model: ModelShape, seq_lens: list[int], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A random cache with a shuffled block table per sequence (blocks scattered like a real pool)."""
    blocks_per_seq = [-(-n // BLOCK_SIZE) for n in seq_lens]
    num_blocks = sum(blocks_per_seq)
    cache = torch.randn(2, num_blocks, BLOCK_SIZE, model.num_kv_heads, model.head_dim, device=DEVICE, dtype=dtype)
    pool = torch.randperm(num_blocks, device=DEVICE, dtype=torch.int32)
    table = torch.zeros(len(seq_lens), max(blocks_per_seq), dtype=torch.int32, device=DEVICE)
    start = 0
    for seq, count in enumerate(blocks_per_seq):
        table[seq, :count] = pool[start:start + count]
        start += count
    return cache, table


def attention_cases(model: ModelShape, dtype: torch.dtype) -> list[Case]:
    from engine.kernels import kv_cache_write as kvw
    from engine.kernels import paged_decode_attention as dec
    from engine.kernels import paged_prefill_attention as pre

    elem = torch.finfo(dtype).bits // 8
    kv_bytes_per_token = 2 * model.num_kv_heads * model.head_dim * elem
    q_bytes_per_token = model.num_heads * model.head_dim * elem
    cases = []
    for batch, context in ((64, 1024), (8, 8192)):
        seq_lens = [context] * batch
        cache, table = paged_cache(model, seq_lens, dtype)
        seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
        query = torch.randn(batch, model.num_heads, model.head_dim, device=DEVICE, dtype=dtype)
        args = (query, cache, table, seq_lens_t, context)
        cases.append(Case("decode attention", f"B={batch} ctx={context}",
                          lambda args=args: dec.paged_decode_attention(*args),
                          lambda args=args: dec.paged_decode_attention_reference(*args),
                          batch * (context * kv_bytes_per_token + 2 * q_bytes_per_token),
                          4.0 * batch * context * model.num_heads * model.head_dim))
    num_chunks, chunk, context = 4, 512, 512
    seq_lens = [context + chunk] * num_chunks
    cache, table = paged_cache(model, seq_lens, dtype)
    query = torch.randn(num_chunks * chunk, model.num_heads, model.head_dim, device=DEVICE, dtype=dtype)
    query_start_loc = torch.arange(0, num_chunks * chunk + 1, chunk, dtype=torch.int32, device=DEVICE)
    args = (query, cache, table, torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE), query_start_loc, chunk)
    visible_keys = num_chunks * sum(context + j + 1 for j in range(chunk))
    cases.append(Case("prefill attention", f"{num_chunks}x{chunk} tok, ctx+{context}",
                      lambda: pre.paged_prefill_attention(*args), lambda: pre.paged_prefill_attention_reference(*args),
                      num_chunks * ((context + chunk) * kv_bytes_per_token + 2 * chunk * q_bytes_per_token),
                      4.0 * visible_keys * model.num_heads * model.head_dim))
    num_tokens = 256
    key = torch.randn(num_tokens, model.num_kv_heads, model.head_dim, device=DEVICE, dtype=dtype)
    value = torch.randn_like(key)
    slots = torch.randperm(cache.shape[1] * BLOCK_SIZE, device=DEVICE)[:num_tokens]
    cases.append(Case("kv cache write", f"T={num_tokens}",
                      lambda: kvw.kv_cache_write(key, value, cache, slots),
                      lambda: kvw.kv_cache_write_reference(key, value, cache, slots),
                      2 * num_tokens * kv_bytes_per_token, 0.0))
    return cases


def norm_and_rotary_cases(model: ModelShape, dtype: torch.dtype) -> list[Case]:
    from engine.kernels import rms_norm as rms
    from engine.kernels import rotary as rot

    elem = torch.finfo(dtype).bits // 8
    cases = []
    for num_tokens in (64, 4096):
        x = torch.randn(num_tokens, model.hidden_size, device=DEVICE, dtype=dtype)
        residual = torch.randn_like(x)
        weight = torch.randn(model.hidden_size, device=DEVICE, dtype=dtype)
        cases.append(Case("rms_norm + residual", f"T={num_tokens}",
                          lambda x=x, r=residual, w=weight: rms.rms_norm(x, w, 1e-5, residual=r),
                          lambda x=x, r=residual, w=weight: rms.rms_norm_reference(x, w, 1e-5, residual=r),
                          4.0 * num_tokens * model.hidden_size * elem, 0.0))
    num_tokens, max_positions = 4096, 8192
    query = torch.randn(num_tokens, model.num_heads, model.head_dim, device=DEVICE, dtype=dtype)
    key = torch.randn(num_tokens, model.num_kv_heads, model.head_dim, device=DEVICE, dtype=dtype)
    cos = torch.randn(max_positions, model.head_dim // 2, device=DEVICE)
    sin = torch.randn_like(cos)
    positions = torch.randint(0, max_positions, (num_tokens,), device=DEVICE)
    heads = model.num_heads + model.num_kv_heads
    cases.append(Case("rotary (in place)", f"T={num_tokens}",
                      lambda: rot.apply_rotary(query, key, positions, cos, sin),
                      lambda: rot.apply_rotary_reference(query, key, positions, cos, sin),
                      num_tokens * (2.0 * heads * model.head_dim * elem + model.head_dim * 4), 0.0))
    return cases


def gemv_cases(model: ModelShape, dtype: torch.dtype) -> list[Case]:
    from engine.kernels import gemv as gv

    elem = torch.finfo(dtype).bits // 8
    qkv_dim = (model.num_heads + 2 * model.num_kv_heads) * model.head_dim
    projections = {"qkv": (qkv_dim, model.hidden_size), "gate_up": (2 * model.intermediate_size, model.hidden_size),
                   "down": (model.hidden_size, model.intermediate_size)}
    cases = []
    for name, (n, k) in projections.items():
        weight = torch.randn(n, k, device=DEVICE, dtype=dtype) / k ** 0.5
        weight_int8 = torch.randint(-127, 128, (n, k), device=DEVICE, dtype=torch.int8)
        scale = torch.rand(n, device=DEVICE, dtype=dtype) / 127
        for num_rows in (1, 16):
            x = torch.randn(num_rows, k, device=DEVICE, dtype=dtype)
            activation_bytes = (num_rows * k + num_rows * n) * elem
            cases.append(Case(f"gemv {name}", f"M={num_rows} N={n} K={k}",
                              lambda x=x, w=weight: gv.gemv(x, w), lambda x=x, w=weight: gv.gemv_reference(x, w),
                              n * k * elem + activation_bytes, 2.0 * num_rows * n * k))
            cases.append(Case(f"gemv {name} int8", f"M={num_rows} N={n} K={k}",
                              lambda x=x, w=weight_int8, s=scale: gv.gemv(x, w, s),
                              lambda x=x, w=weight_int8, s=scale: gv.gemv_reference(x, w, s),
                              n * k + n * elem + activation_bytes, 2.0 * num_rows * n * k))
    return cases


def elastic_gemm_cases(model: ModelShape, dtype: torch.dtype) -> list[Case]:
    from engine.kernels import elastic_gemm as eg

    elem = torch.finfo(dtype).bits // 8
    n, k = model.intermediate_size, model.hidden_size  # an up projection, sliced per request
    rows = [16, 16, 16, 16]
    widths = [n, n // 2, n // 4, n // 8]
    x = torch.randn(sum(rows), k, device=DEVICE, dtype=dtype)
    weight = torch.randn(n, k, device=DEVICE, dtype=dtype) / k ** 0.5
    offsets = torch.tensor([0, 16, 32, 48, 64], dtype=torch.int32, device=DEVICE)
    cases = []
    for mode in ("out", "in"):
        width_t = torch.tensor(widths if mode == "out" else [w * k // n for w in widths], dtype=torch.int32,
                               device=DEVICE)
        active = [w * k for w in widths]  # weight elements each segment reads, either mode
        cases.append(Case(f"elastic gemm ({mode})", f"4x16 rows, N={n} K={k}, widths 1..1/8",
                          lambda m=mode, w=width_t: eg.elastic_gemm(x, weight, offsets, w, m, 16),
                          lambda m=mode, w=width_t: eg.elastic_gemm_reference(x, weight, offsets, w, m, 16),
                          sum(active) * elem + x.numel() * elem + x.shape[0] * n * elem,
                          2.0 * sum(r * a for r, a in zip(rows, active))))
    return cases


def print_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)))


if __name__ == "__main__":
    sys.exit(main())
