"""RMSNorm, optionally fused with the residual add that precedes it in every decoder layer.

    plain:  out = weight * to_dtype(x32 * rsqrt(mean(x32^2) + eps))                x32 = fp32(x)
    fused:  residual_out = to_dtype(x + residual);  out = the plain norm of residual_out

The rounding points match engine.model.llama.RMSNorm: normalize in fp32, round to the model dtype,
then scale by the weight. One program per row; the whole row sits in registers (hidden <= 65536).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels._common import (FLOAT_DTYPES, cast_to, check_dtype, check_last_dim_contiguous,
                                    check_launchable, check_ndim, check_same_device, is_interpreted)

MAX_HIDDEN_SIZE = 65536


@triton.jit
def _rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr,
    hidden_size, eps,
    stride_x, stride_r, stride_o, stride_ro,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, INTERPRETED: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden_size
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        summed = cast_to(x + residual, residual_out_ptr.dtype.element_ty, INTERPRETED)
        tl.store(residual_out_ptr + row * stride_ro + cols, summed, mask=mask)
        x = summed.to(tl.float32)
    mean_square = tl.sum(x * x, axis=0) / hidden_size
    normed = cast_to(x * tl.rsqrt(mean_square + eps), out_ptr.dtype.element_ty, INTERPRETED).to(tl.float32)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    out = cast_to(normed * weight, out_ptr.dtype.element_ty, INTERPRETED)
    tl.store(out_ptr + row * stride_o + cols, out, mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """x [num_tokens, hidden], weight [hidden] (x's dtype) -> out; with residual [num_tokens, hidden]
    -> (out, residual_out), where residual_out = x + residual is the next layer's residual."""
    _check_args(x, weight, residual)
    check_launchable(_rms_norm_kernel, x.device)
    num_rows, hidden_size = x.shape
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    residual_out = torch.empty_like(out) if residual is not None else out
    if num_rows:
        block = triton.next_power_of_2(hidden_size)
        _rms_norm_kernel[(num_rows,)](
            x, residual if residual is not None else x, weight, out, residual_out,
            hidden_size, eps,
            x.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0), residual_out.stride(0),
            HAS_RESIDUAL=residual is not None, BLOCK=block, INTERPRETED=is_interpreted(_rms_norm_kernel),
            num_warps=_num_warps(block),
        )
    return out if residual is None else (out, residual_out)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float,
                       residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The contract in plain torch, rounding where engine.model.llama.RMSNorm rounds."""
    if residual is not None:
        residual_out = (x.float() + residual.float()).to(x.dtype)
        return rms_norm_reference(residual_out, weight, eps), residual_out
    x32 = x.float()
    normed = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return (normed.float() * weight.float()).to(x.dtype)


def _num_warps(block: int) -> int:
    return 4 if block <= 2048 else 8 if block <= 8192 else 16


def _check_args(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None) -> None:
    check_ndim("x", x, 2, "[num_tokens, hidden_size]")
    check_dtype("x", x, FLOAT_DTYPES)
    check_last_dim_contiguous("x", x)
    hidden_size = x.shape[1]
    if hidden_size > MAX_HIDDEN_SIZE:
        raise ValueError(f"hidden_size {hidden_size} exceeds the kernel's one-block row limit {MAX_HIDDEN_SIZE}")
    if weight.shape != (hidden_size,) or weight.dtype != x.dtype:
        raise ValueError(f"weight must be [{hidden_size}] {x.dtype}, got {tuple(weight.shape)} {weight.dtype}")
    check_last_dim_contiguous("weight", weight)
    tensors = {"x": x, "weight": weight}
    if residual is not None:
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError(f"residual must match x ({tuple(x.shape)} {x.dtype}), "
                             f"got {tuple(residual.shape)} {residual.dtype}")
        check_last_dim_contiguous("residual", residual)
        tensors["residual"] = residual
    check_same_device(**tensors)
