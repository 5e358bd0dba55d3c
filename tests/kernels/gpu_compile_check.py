"""Compile every kernel ahead of time for an NVIDIA target, with no GPU: `triton.compile` lowers
to PTX and runs the bundled ptxas, so a kernel that is not GPU-legal (a bad tl.dot shape, a
type error the interpreter lets through) fails here. Prints one JSON line per kernel.

    python tests/kernels/gpu_compile_check.py 90     (run without TRITON_INTERPRET)
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("run without TRITON_INTERPRET: the interpreter's kernels cannot be compiled")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from engine.kernels import elastic_gemm, gemv, kv_cache_write, paged_decode_attention, paged_prefill_attention  # noqa: E402
from engine.kernels import rms_norm, rotary  # noqa: E402

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def signature(kernel: triton.JITFunction, pointers: dict[str, str], constexprs: dict[str, object]) -> dict[str, str]:
    """Pointers as given, scales fp32, every other runtime argument (sizes, strides) i32."""
    types = {}
    for name in kernel.arg_names:
        if name in constexprs:
            types[name] = "constexpr"
        elif name in pointers:
            types[name] = pointers[name]
        else:
            types[name] = "fp32" if name in ("qk_scale", "eps") else "i32"
    return types


def configurations(dt: str) -> list[tuple[str, triton.JITFunction, dict[str, str], dict[str, object], int]]:
    """(label, kernel, pointer types, constexprs, num_stages) as the wrappers launch them."""
    dtype = TORCH_DTYPES[dt]
    attention_pointers = {"query_ptr": f"*{dt}", "cache_ptr": f"*{dt}", "out_ptr": f"*{dt}",
                          "block_tables_ptr": "*i32", "seq_lens_ptr": "*i32", "query_start_loc_ptr": "*i32",
                          "partial_out_ptr": "*fp32", "partial_max_ptr": "*fp32", "partial_sum_ptr": "*fp32"}
    configs = []
    # (head_dim, group, int8 cache): the int8 rows of kv_cache_format.py at SmolLM2's shape
    for head_dim, group, quantized in ((64, 3, False), (128, 8, False), (64, 3, True)):
        pointers = {**attention_pointers, "cache_ptr": "*i8"} if quantized else attention_pointers
        label = f"D={head_dim} G={group}" + (" int8 cache" if quantized else "")
        decode = dict(GROUP=group, BLOCK_G=16, BLOCK_N=paged_decode_attention._block_n(dtype, head_dim),
                      BLOCK_D=head_dim, PARTITION_SIZE=512, QUANTIZED=quantized, INTERPRETED=False)
        configs.append((f"decode {label}", paged_decode_attention._decode_partial_kernel, pointers, decode, 2))
        block_m, block_n = paged_prefill_attention._tile_shape(dtype, head_dim, 1024)
        prefill = dict(GROUP=group, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=head_dim, QUANTIZED=quantized,
                       INTERPRETED=False)
        configs.append((f"prefill {label}", paged_prefill_attention._prefill_kernel, pointers, prefill, 2))
    configs.append(("decode reduce", paged_decode_attention._decode_reduce_kernel, attention_pointers,
                    dict(BLOCK_S=4, BLOCK_D=128, PARTITION_SIZE=512, INTERPRETED=False), 3))
    for cache_type in ("bf16", "i8"):
        configs.append((f"kv cache write into {cache_type}", kv_cache_write._kv_cache_write_kernel,
                        {"key_ptr": f"*{dt}", "value_ptr": f"*{dt}", "cache_ptr": f"*{cache_type}",
                         "slot_mapping_ptr": "*i64"},
                        dict(BLOCK_H=8, BLOCK_D=128, QUANTIZED=cache_type == "i8", INTERPRETED=False), 3))
    norm_pointers = {name: f"*{dt}" for name in ("x_ptr", "residual_ptr", "weight_ptr", "out_ptr", "residual_out_ptr")}
    configs.append(("rms_norm + residual", rms_norm._rms_norm_kernel, norm_pointers,
                    dict(HAS_RESIDUAL=True, BLOCK=4096, INTERPRETED=False), 3))
    configs.append(("rotary", rotary._rotary_kernel,
                    {"q_ptr": f"*{dt}", "k_ptr": f"*{dt}", "positions_ptr": "*i64", "cos_ptr": "*fp32", "sin_ptr": "*fp32"},
                    dict(BLOCK_HQ=32, BLOCK_HK=8, BLOCK_HALF=64, INTERPRETED=False), 3))
    for is_int8 in (False, True):
        configs.append((f"gemv int8={is_int8}", gemv._gemv_kernel,
                        {"x_ptr": f"*{dt}", "weight_ptr": "*i8" if is_int8 else f"*{dt}", "scale_ptr": f"*{dt}",
                         "out_ptr": "*fp32"},
                        dict(HAS_SCALE=is_int8, BLOCK_M=16, BLOCK_N=gemv.BLOCK_N, BLOCK_K=gemv.BLOCK_K,
                             INTERPRETED=False), gemv.num_stages_for(dtype)))
    configs.append(("elastic gemm", elastic_gemm._elastic_gemm_kernel,
                    {"x_ptr": f"*{dt}", "weight_ptr": f"*{dt}", "out_ptr": f"*{dt}", "segment_offsets_ptr": "*i32",
                     "active_widths_ptr": "*i32"},
                    dict(IS_MODE_OUT=True, BLOCK_M=64, BLOCK_N=elastic_gemm.BLOCK_N, BLOCK_K=elastic_gemm.BLOCK_K,
                         INTERPRETED=False), elastic_gemm.num_stages_for(dtype)))
    return configs


def main(arch: int) -> None:
    target = GPUTarget("cuda", arch, 32)
    for dt in TORCH_DTYPES:
        for label, kernel, pointers, constexprs, num_stages in configurations(dt):
            source = ASTSource(fn=kernel, signature=signature(kernel, pointers, constexprs), constexprs=constexprs)
            compiled = triton.compile(source, target=target, options={"num_warps": 4, "num_stages": num_stages})
            print(json.dumps({"kernel": f"{label} {dt}", "arch": arch, "shared_bytes": compiled.metadata.shared}))


if __name__ == "__main__":
    main(int(sys.argv[1]))
