"""Decode GEMV / skinny GEMM: y = x @ W^T for M <= 16 rows, W [N, K] in fp16/bf16/fp32 or int8.

Weight-only int8: y = (x @ W_int8^T) * scale[N], per-output-channel fp scales. int8 values are
exact in bf16/fp16, so the int8 tile is converted to x's dtype and fed to the same tl.dot.

Decode is bound by reading W once, so the grid is (N tiles, K splits): with few output tiles
(e.g. a 576-wide projection) K is split to keep every SM streaming weights. Each split writes an
fp32 partial [split, M, N] that one torch sum reduces (deterministic, unlike atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels._common import (FLOAT_DTYPES, cast_to, check_dtype, check_last_dim_contiguous,
                                    check_launchable, check_ndim, check_same_device, is_interpreted, mma,
                                    num_stages_for)

MAX_ROWS = 16
BLOCK_N = 64
BLOCK_K = 128


@triton.jit
def _gemv_kernel(
    x_ptr, weight_ptr, scale_ptr, out_ptr,
    num_rows, n, k, k_per_split,
    stride_xm, stride_wn, stride_os, stride_om,
    HAS_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_start = split * k_per_split
    k_end = tl.minimum(k_start + k_per_split, k)
    # int64 row offsets: N * K passes 2^31 elements for large vocab projections.
    w_rows = weight_ptr + cols.to(tl.int64)[:, None] * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < k_end
        x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :],
                    mask=(rows[:, None] < num_rows) & k_mask[None, :], other=0.0)
        w = tl.load(w_rows + ks[None, :], mask=(cols[:, None] < n) & k_mask[None, :], other=0)
        if HAS_SCALE:  # int8 -> fp32 -> x's dtype: exact, and the interpreter can't go int8 -> bf16
            w = w.to(tl.float32).to(x.dtype)
        acc += mma(x, tl.trans(w), INTERPRETED)
    if HAS_SCALE:
        acc *= tl.load(scale_ptr + cols, mask=cols < n, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + split * stride_os + rows[:, None] * stride_om + cols[None, :]
    out_mask = (rows[:, None] < num_rows) & (cols[None, :] < n)
    tl.store(out, cast_to(acc, out_ptr.dtype.element_ty, INTERPRETED), mask=out_mask)


def gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None,
         split_k: int | None = None) -> torch.Tensor:
    """x [M, K] (M <= 16), weight [N, K] (x's dtype, or int8 with scale [N]) -> y [M, N] in x's dtype.

    split_k: K splits (None: enough to cover the device's SMs about twice over)."""
    _check_args(x, weight, scale)
    check_launchable(_gemv_kernel, x.device)
    num_rows, k = x.shape
    n = weight.shape[0]
    if num_rows == 0 or n == 0 or k == 0:
        return torch.zeros(num_rows, n, dtype=x.dtype, device=x.device)
    num_n_tiles = triton.cdiv(n, BLOCK_N)
    num_k_tiles = triton.cdiv(k, BLOCK_K)
    split_k = _default_split_k(x.device, num_n_tiles) if split_k is None else split_k
    k_per_split = triton.cdiv(num_k_tiles, max(1, min(split_k, num_k_tiles))) * BLOCK_K
    split_k = triton.cdiv(k, k_per_split)  # every split non-empty
    # One split writes y itself; more write fp32 partials [split, M, N] for one torch sum.
    if split_k == 1:
        out = torch.empty(num_rows, n, dtype=x.dtype, device=x.device)
    else:
        out = torch.empty(split_k, num_rows, n, dtype=torch.float32, device=x.device)
    _gemv_kernel[(num_n_tiles, split_k)](
        x, weight, scale if scale is not None else x, out,
        num_rows, n, k, k_per_split,
        x.stride(0), weight.stride(0), out.stride(0) if split_k > 1 else 0, out.stride(-2),
        HAS_SCALE=scale is not None, BLOCK_M=MAX_ROWS, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        INTERPRETED=is_interpreted(_gemv_kernel), num_stages=num_stages_for(x.dtype),
    )
    return out if split_k == 1 else out.sum(0).to(x.dtype)


def gemv_reference(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None,
                   split_k: int | None = None) -> torch.Tensor:
    """The contract in plain torch, fp32 accumulation; split_k is unused."""
    y = x.float() @ weight.float().T
    if scale is not None:
        y = y * scale.float()
    return y.to(x.dtype)


def _default_split_k(device: torch.device, num_n_tiles: int) -> int:
    if device.type != "cuda":
        return 1
    num_sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, 2 * num_sms // num_n_tiles)


def _check_args(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None) -> None:
    check_ndim("x", x, 2, "[num_rows, in_features]")
    check_ndim("weight", weight, 2, "[out_features, in_features]")
    check_dtype("x", x, FLOAT_DTYPES)
    if x.shape[0] > MAX_ROWS:
        raise ValueError(f"gemv takes at most {MAX_ROWS} rows, got {x.shape[0]}; use a GEMM (torch.matmul)")
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"x has {x.shape[1]} features, weight {tuple(weight.shape)} expects {weight.shape[1]}")
    check_last_dim_contiguous("x", x)
    check_last_dim_contiguous("weight", weight)
    tensors = {"x": x, "weight": weight}
    if weight.dtype == torch.int8:
        if scale is None:
            raise ValueError("an int8 weight needs per-output-channel scale [out_features]")
        if scale.shape != (weight.shape[0],):
            raise ValueError(f"scale must be [{weight.shape[0]}], got {tuple(scale.shape)}")
        check_dtype("scale", scale, FLOAT_DTYPES)
        check_last_dim_contiguous("scale", scale)
        tensors["scale"] = scale
    elif weight.dtype != x.dtype:
        raise ValueError(f"weight dtype {weight.dtype} must be x's ({x.dtype}) or int8")
    elif scale is not None:
        raise ValueError("scale applies only to an int8 weight")
    check_same_device(**tensors)
