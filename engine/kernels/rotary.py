"""Rotary position embedding (HF rotate-half layout), applied in place to Q and K.

    x = [x1 | x2] (halves of head_dim);  x <- [x1 cos - x2 sin | x2 cos + x1 sin]
    cos, sin: [max_positions, head_dim / 2] float32, row = the token's absolute position.

Math in fp32, rounded once to the tensor's dtype, as engine.model.llama._rotate does. One program
per token rotates all its query heads and all its key heads with one cos/sin row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels._common import (FLOAT_DTYPES, cast_to, check_contiguous, check_dtype,
                                    check_last_dim_contiguous, check_launchable, check_ndim,
                                    check_same_device, is_interpreted)


@triton.jit
def _rotate_heads(x_ptr, token, stride_t, stride_h, num_heads, cos, sin, half_dim,
                  BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, INTERPRETED: tl.constexpr):
    heads = tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_HALF)
    mask = (heads[:, None] < num_heads) & (cols[None, :] < half_dim)
    first = x_ptr + token * stride_t + heads[:, None] * stride_h + cols[None, :]
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(first + half_dim, mask=mask, other=0.0).to(tl.float32)
    dtype = x_ptr.dtype.element_ty
    tl.store(first, cast_to(x1 * cos[None, :] - x2 * sin[None, :], dtype, INTERPRETED), mask=mask)
    tl.store(first + half_dim, cast_to(x2 * cos[None, :] + x1 * sin[None, :], dtype, INTERPRETED), mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, positions_ptr, cos_ptr, sin_ptr,
    num_q_heads, num_kv_heads, half_dim,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_cos, stride_sin,
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr, INTERPRETED: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    position = tl.load(positions_ptr + token).to(tl.int64)
    cols = tl.arange(0, BLOCK_HALF)
    cos = tl.load(cos_ptr + position * stride_cos + cols, mask=cols < half_dim, other=0.0)
    sin = tl.load(sin_ptr + position * stride_sin + cols, mask=cols < half_dim, other=0.0)
    _rotate_heads(q_ptr, token, stride_qt, stride_qh, num_q_heads, cos, sin, half_dim,
                  BLOCK_HQ, BLOCK_HALF, INTERPRETED)
    _rotate_heads(k_ptr, token, stride_kt, stride_kh, num_kv_heads, cos, sin, half_dim,
                  BLOCK_HK, BLOCK_HALF, INTERPRETED)


def apply_rotary(query: torch.Tensor, key: torch.Tensor, positions: torch.Tensor,
                 cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate query [T, Hq, D] and key [T, Hkv, D] in place; positions [T] (int32/int64, each
    < max_positions: not checked, that would sync), cos/sin [max_positions, D/2] float32."""
    _check_args(query, key, positions, cos, sin)
    check_launchable(_rotary_kernel, query.device)
    num_tokens, num_q_heads, head_dim = query.shape
    if num_tokens == 0:
        return
    half_dim = head_dim // 2
    _rotary_kernel[(num_tokens,)](
        query, key, positions, cos, sin,
        num_q_heads, key.shape[1], half_dim,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), cos.stride(0), sin.stride(0),
        BLOCK_HQ=triton.next_power_of_2(num_q_heads), BLOCK_HK=triton.next_power_of_2(key.shape[1]),
        BLOCK_HALF=triton.next_power_of_2(half_dim), INTERPRETED=is_interpreted(_rotary_kernel),
    )


def apply_rotary_reference(query: torch.Tensor, key: torch.Tensor, positions: torch.Tensor,
                           cos: torch.Tensor, sin: torch.Tensor) -> None:
    """The contract in plain torch: the same in-place rotation."""
    cos_rows = cos[positions][:, None, :]  # [T, 1, D/2]
    sin_rows = sin[positions][:, None, :]
    for x in (query, key):
        x1, x2 = x.float().chunk(2, dim=-1)
        x.copy_(torch.cat((x1 * cos_rows - x2 * sin_rows, x2 * cos_rows + x1 * sin_rows), dim=-1))


def _check_args(query: torch.Tensor, key: torch.Tensor, positions: torch.Tensor,
                cos: torch.Tensor, sin: torch.Tensor) -> None:
    check_ndim("query", query, 3, "[num_tokens, num_q_heads, head_dim]")
    check_ndim("key", key, 3, "[num_tokens, num_kv_heads, head_dim]")
    if key.shape[0] != query.shape[0] or key.shape[2] != query.shape[2]:
        raise ValueError(f"query {tuple(query.shape)} and key {tuple(key.shape)} must agree on tokens and head_dim")
    head_dim = query.shape[2]
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for rotate-half RoPE, got {head_dim}")
    for name, tensor in (("query", query), ("key", key)):
        check_dtype(name, tensor, FLOAT_DTYPES)
        check_last_dim_contiguous(name, tensor)
    check_ndim("positions", positions, 1, "[num_tokens]")
    check_dtype("positions", positions, (torch.int32, torch.int64))
    check_contiguous("positions", positions)
    if positions.shape[0] != query.shape[0]:
        raise ValueError(f"positions has {positions.shape[0]} entries for {query.shape[0]} tokens")
    for name, table in (("cos", cos), ("sin", sin)):
        check_ndim(name, table, 2, "[max_positions, head_dim / 2]")
        check_dtype(name, table, (torch.float32,))
        check_last_dim_contiguous(name, table)
        if table.shape[1] != head_dim // 2:
            raise ValueError(f"{name} has {table.shape[1]} columns, head_dim / 2 is {head_dim // 2}")
    check_same_device(query=query, key=key, positions=positions, cos=cos, sin=sin)
