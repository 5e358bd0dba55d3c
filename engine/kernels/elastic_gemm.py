"""Elastic GEMM: y = x @ W^T where each segment of rows uses only a prefix of W.

Segments are row ranges segment_offsets[s] .. segment_offsets[s+1] of x, each with an active width:

    mode "out": segment s computes only outputs 0 .. width[s]-1; the rest of its row is zero
        y[rows_s, :w] = x[rows_s] @ W[:w]^T          y[rows_s, w:] = 0
    mode "in":  segment s reads only input features 0 .. width[s]-1 of x and W
        y[rows_s, :]  = x[rows_s, :w] @ W[:, :w]^T

One launch serves a batch whose requests run different elastic submodels of one weight matrix.
Grid (segments, row tiles of the longest segment, output tiles); tiles past their segment's rows,
or (mode "out") past its width, run no K iterations and store zeros or nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels._common import (FLOAT_DTYPES, cast_to, check_contiguous, check_dtype,
                                    check_last_dim_contiguous, check_launchable, check_ndim,
                                    check_same_device, is_interpreted, mma, num_stages_for)

MODES = ("out", "in")
BLOCK_N = 64
BLOCK_K = 64


@triton.jit
def _elastic_gemm_kernel(
    x_ptr, weight_ptr, out_ptr, segment_offsets_ptr, active_widths_ptr,
    n, k,
    stride_xm, stride_wn, stride_om,
    IS_MODE_OUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    segment = tl.program_id(0)
    row_tile = tl.program_id(1)
    pid_n = tl.program_id(2)
    row_start = tl.load(segment_offsets_ptr + segment) + row_tile * BLOCK_M
    row_end = tl.load(segment_offsets_ptr + segment + 1)
    width = tl.load(active_widths_ptr + segment)
    if IS_MODE_OUT:
        n_limit = tl.minimum(width, n)
        k_limit = k
    else:
        n_limit = n
        k_limit = tl.minimum(width, k)
    rows = (row_start + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_mask = rows < row_end
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    w_rows = weight_ptr + cols.to(tl.int64)[:, None] * stride_wn
    # No K work for a tile with no rows, or whose outputs all lie past the active width.
    has_work = (row_start < row_end) & (pid_n * BLOCK_N < n_limit)
    k_end = tl.where(has_work, k_limit, 0)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < k_limit
        x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :], mask=row_mask[:, None] & k_mask[None, :],
                    other=0.0)
        w = tl.load(w_rows + ks[None, :], mask=(cols[:, None] < n_limit) & k_mask[None, :], other=0.0)
        acc += mma(x, tl.trans(w), INTERPRETED)
    # Columns past n_limit read zero weights, so their accumulators are the zeros mode "out" stores.
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], cast_to(acc, out_ptr.dtype.element_ty, INTERPRETED),
             mask=row_mask[:, None] & (cols[None, :] < n))


def elastic_gemm(x: torch.Tensor, weight: torch.Tensor, segment_offsets: torch.Tensor,
                 active_widths: torch.Tensor, mode: str, max_segment_rows: int) -> torch.Tensor:
    """x [M, K], weight [N, K] (x's dtype); segment_offsets [S+1] int32 (ascending row starts, 0 .. M),
    active_widths [S] int32 (outputs kept in mode "out", input features used in mode "in");
    max_segment_rows (host) >= the longest segment. Returns y [M, N]; rows in no segment are zero."""
    _check_args(x, weight, segment_offsets, active_widths, mode)
    check_launchable(_elastic_gemm_kernel, x.device)
    num_rows, k = x.shape
    n = weight.shape[0]
    out = torch.zeros(num_rows, n, dtype=x.dtype, device=x.device)
    num_segments = active_widths.shape[0]
    if num_segments == 0 or max_segment_rows == 0 or n == 0:
        return out
    block_m = 16 if max_segment_rows <= 16 else 64
    grid = (num_segments, triton.cdiv(max_segment_rows, block_m), triton.cdiv(n, BLOCK_N))
    _elastic_gemm_kernel[grid](
        x, weight, out, segment_offsets, active_widths,
        n, k,
        x.stride(0), weight.stride(0), out.stride(0),
        IS_MODE_OUT=mode == "out", BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        INTERPRETED=is_interpreted(_elastic_gemm_kernel), num_stages=num_stages_for(x.dtype),
    )
    return out


def elastic_gemm_reference(x: torch.Tensor, weight: torch.Tensor, segment_offsets: torch.Tensor,
                           active_widths: torch.Tensor, mode: str, max_segment_rows: int) -> torch.Tensor:
    """The contract in plain torch, fp32 accumulation; max_segment_rows is unused."""
    out = torch.zeros(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
    offsets = segment_offsets.tolist()
    for segment, width in enumerate(active_widths.tolist()):
        rows = slice(offsets[segment], offsets[segment + 1])
        if mode == "out":
            out[rows, :width] = (x[rows].float() @ weight[:width].float().T).to(x.dtype)
        else:
            out[rows] = (x[rows, :width].float() @ weight[:, :width].float().T).to(x.dtype)
    return out


def _check_args(x: torch.Tensor, weight: torch.Tensor, segment_offsets: torch.Tensor,
                active_widths: torch.Tensor, mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    check_ndim("x", x, 2, "[num_rows, in_features]")
    check_ndim("weight", weight, 2, "[out_features, in_features]")
    check_dtype("x", x, FLOAT_DTYPES)
    if weight.dtype != x.dtype:
        raise ValueError(f"weight dtype {weight.dtype} must be x's ({x.dtype})")
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"x has {x.shape[1]} features, weight {tuple(weight.shape)} expects {weight.shape[1]}")
    check_last_dim_contiguous("x", x)
    check_last_dim_contiguous("weight", weight)
    for name, tensor in (("segment_offsets", segment_offsets), ("active_widths", active_widths)):
        check_ndim(name, tensor, 1, "(1-D)")
        check_dtype(name, tensor, (torch.int32,))
        check_contiguous(name, tensor)
    if segment_offsets.shape[0] != active_widths.shape[0] + 1:
        raise ValueError(f"{active_widths.shape[0]} segments need {active_widths.shape[0] + 1} offsets, "
                         f"got {segment_offsets.shape[0]}")
    check_same_device(x=x, weight=weight, segment_offsets=segment_offsets, active_widths=active_widths)
