"""Write this step's K/V rows into the paged cache through the slot mapping.

    kv_cache: [2, num_blocks, block_size, num_kv_heads, head_dim]   (0 = K, 1 = V)
    slot = block_id * block_size + offset_in_block;  slot < 0 marks a padding token (skipped).

One program per token stores all its KV heads: [num_kv_heads, head_dim] for K and for V.  An int8
cache (kv_cache_format.py) gets each head's row quantized, with torch's quantize_rows' bytes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels._common import (FLOAT_DTYPES, cast_to, check_contiguous, check_dtype, check_kv_cache,
                                    check_last_dim_contiguous, check_launchable, check_ndim,
                                    check_same_device, is_interpreted)
from engine.kernels.kv_cache_format import is_int8, to_cache_rows


@triton.jit
def _kv_cache_write_kernel(
    key_ptr, value_ptr, cache_ptr, slot_mapping_ptr,
    num_kv_heads, head_dim, block_size,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kv, stride_cb, stride_cs, stride_ch,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, QUANTIZED: tl.constexpr, INTERPRETED: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    # int64 throughout: block_id * stride_cb passes 2^31 elements in a large cache.
    block_id = slot // block_size
    offset_in_block = slot % block_size
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    # A padding token writes no heads. (A row count, not `block_mask & (slot >= 0)`: the
    # interpreter mishandles a block mask and-ed with a scalar one.)
    num_heads = tl.where(slot >= 0, num_kv_heads, 0)
    mask = (heads[:, None] < num_heads) & (dims[None, :] < head_dim)
    # other=0: an int8 row's scale is the maximum over the whole tile row, padding dims included
    k = tl.load(key_ptr + token * stride_kt + heads[:, None] * stride_kh + dims[None, :], mask=mask, other=0.0)
    v = tl.load(value_ptr + token * stride_vt + heads[:, None] * stride_vh + dims[None, :], mask=mask, other=0.0)
    row_ptrs = cache_ptr + block_id * stride_cb + offset_in_block * stride_cs + heads * stride_ch  # [BLOCK_H]
    if QUANTIZED:
        _store_int8_rows(row_ptrs, k, dims, heads < num_heads, head_dim)
        _store_int8_rows(row_ptrs + stride_kv, v, dims, heads < num_heads, head_dim)
    else:
        tl.store(row_ptrs[:, None] + dims[None, :], cast_to(k, cache_ptr.dtype.element_ty, INTERPRETED), mask=mask)
        tl.store(row_ptrs[:, None] + stride_kv + dims[None, :], cast_to(v, cache_ptr.dtype.element_ty, INTERPRETED),
                 mask=mask)


@triton.jit
def _store_int8_rows(row_ptrs, x, dims, live, head_dim):
    """Rows x [BLOCK_H, BLOCK_D] as int8 cache rows: q = round(x / s) with s = max|x| / 127, then s.
    Rounding half to even as torch.round: adding and taking away 1.5 * 2^23 leaves fp32 no bits
    below the unit, and |x / s| <= 127 is far inside the range where that holds."""
    x = x.to(tl.float32)
    scale = tl.max(tl.abs(x), axis=1) / 127.0  # masked dims loaded as 0
    q = x / tl.where(scale > 0, scale, 1.0)[:, None]
    q = (q + 12582912.0) - 12582912.0
    q = tl.minimum(tl.maximum(q, -127.0), 127.0)
    tl.store(row_ptrs[:, None] + dims[None, :], q.to(tl.int8), mask=live[:, None] & (dims[None, :] < head_dim))
    tl.store((row_ptrs + head_dim).to(tl.pointer_type(tl.float32), bitcast=True), scale, mask=live)


def kv_cache_write(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """key/value [T, Hkv, D] -> kv_cache[0/1] at slot_mapping [T] (int64; < 0 skips the token)."""
    _check_args(key, value, kv_cache, slot_mapping)
    check_launchable(_kv_cache_write_kernel, key.device)
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    _kv_cache_write_kernel[(num_tokens,)](
        key, value, kv_cache, slot_mapping,
        num_kv_heads, head_dim, kv_cache.shape[2],
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        BLOCK_H=triton.next_power_of_2(num_kv_heads), BLOCK_D=triton.next_power_of_2(head_dim),
        QUANTIZED=is_int8(kv_cache), INTERPRETED=is_interpreted(_kv_cache_write_kernel),
    )


def kv_cache_write_reference(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                             slot_mapping: torch.Tensor) -> None:
    """The contract in plain torch: same arguments, padding slots (< 0) skipped."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    flat = kv_cache.view(2, -1, kv_cache.shape[3], kv_cache.shape[4])
    flat[0].index_copy_(0, slots, to_cache_rows(key[keep], kv_cache))
    flat[1].index_copy_(0, slots, to_cache_rows(value[keep], kv_cache))


def _check_args(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                slot_mapping: torch.Tensor) -> None:
    check_ndim("key", key, 3, "[num_tokens, num_kv_heads, head_dim]")
    if value.shape != key.shape:
        raise ValueError(f"value shape {tuple(value.shape)} must equal key shape {tuple(key.shape)}")
    check_kv_cache(kv_cache, num_kv_heads=key.shape[1], head_dim=key.shape[2])
    check_dtype("key", key, FLOAT_DTYPES)
    check_dtype("value", value, FLOAT_DTYPES)
    check_last_dim_contiguous("key", key)
    check_last_dim_contiguous("value", value)
    check_ndim("slot_mapping", slot_mapping, 1, "[num_tokens]")
    check_dtype("slot_mapping", slot_mapping, (torch.int64, torch.int32))
    check_contiguous("slot_mapping", slot_mapping)
    if slot_mapping.shape[0] != key.shape[0]:
        raise ValueError(f"slot_mapping has {slot_mapping.shape[0]} entries for {key.shape[0]} tokens")
    check_same_device(key=key, value=value, kv_cache=kv_cache, slot_mapping=slot_mapping)
