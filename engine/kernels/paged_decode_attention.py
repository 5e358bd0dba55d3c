"""Paged decode attention (flash-decoding): one query token per sequence over its paged context.

Grouped-query aware: one program owns a KV head and all GROUP query heads that share it, so each
K/V tile is read once per group. Long contexts are split across programs, then merged:

    context of sequence b:  | split 0 (PARTITION_SIZE) | split 1 | ... | split S-1 (ragged) |
    stage 1, grid (B, Hkv, S): per (query head, split) the running max m, sum l and out = acc / l
    stage 2, grid (B, Hq):     M = max_s m_s;  w_s = l_s * 2^(m_s - M);  out = sum_s w_s out_s / sum_s w_s

Scores live in the log2 domain (scale folded with log2(e)) so the softmax uses exp2.
Splits past a sequence's end are empty: stage 1 stores nothing for them and stage 2 masks them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels._common import (FLOAT_DTYPES, cast_to, check_contiguous, check_dtype, check_kv_cache,
                                    check_last_dim_contiguous, check_launchable, check_ndim,
                                    check_same_device, is_interpreted, load_kv_tile, mma)
from engine.kernels.kv_cache_format import from_cache_rows, is_int8

LOG2_E = 1.4426950408889634
DEFAULT_PARTITION_SIZE = 512  # tokens per split, as in vLLM's paged attention v2


@triton.jit
def _decode_partial_kernel(
    query_ptr, cache_ptr, block_tables_ptr, seq_lens_ptr,
    partial_out_ptr, partial_max_ptr, partial_sum_ptr,
    qk_scale, head_dim, block_size,
    stride_qt, stride_qh,
    stride_kv, stride_cb, stride_cs, stride_ch,
    stride_bt,
    stride_pb, stride_ph, stride_ps, stride_mb, stride_mh,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PARTITION_SIZE: tl.constexpr, QUANTIZED: tl.constexpr, INTERPRETED: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    split_start = split * PARTITION_SIZE
    split_end = tl.minimum(split_start + PARTITION_SIZE, seq_len)  # <= split_start: empty split

    groups = tl.arange(0, BLOCK_G)
    dims = tl.arange(0, BLOCK_D)
    q_heads = kv_head * GROUP + groups
    q_mask = (groups[:, None] < GROUP) & (dims[None, :] < head_dim)
    q = tl.load(query_ptr + seq * stride_qt + q_heads[:, None] * stride_qh + dims[None, :], mask=q_mask, other=0.0)

    # Finite start for the running max: a row never sees -inf - -inf (NaN) in the rescale.
    m_i = tl.full([BLOCK_G], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    k_base = cache_ptr + kv_head * stride_ch
    for start in range(split_start, split_end, BLOCK_N):
        positions = start + tl.arange(0, BLOCK_N)
        valid = positions < split_end
        block_ids = tl.load(block_tables_ptr + seq * stride_bt + positions // block_size, mask=valid, other=0)
        # int64 before the multiply: block_id * stride_cb passes 2^31 elements in a large cache.
        row_offsets = block_ids.to(tl.int64) * stride_cb + (positions % block_size) * stride_cs
        k = load_kv_tile(k_base, row_offsets, dims, valid, head_dim, q.dtype, QUANTIZED, INTERPRETED)
        scores = mma(q, tl.trans(k), INTERPRETED) * qk_scale  # [BLOCK_G, BLOCK_N]
        scores = tl.where(valid[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = load_kv_tile(k_base + stride_kv, row_offsets, dims, valid, head_dim, q.dtype, QUANTIZED, INTERPRETED)
        acc = acc * alpha[:, None] + mma(cast_to(p, v.dtype, INTERPRETED), v, INTERPRETED)
        m_i = m_new

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    # An empty split stores no rows. (Folded into a row count: the interpreter mishandles
    # `block_mask & scalar_mask`.)
    num_rows = tl.where(split_start < seq_len, GROUP, 0)
    row_mask = groups < num_rows
    row_base = seq * stride_pb + q_heads * stride_ph + split * stride_ps
    tl.store(partial_out_ptr + row_base[:, None] + dims[None, :], out,
             mask=row_mask[:, None] & (dims[None, :] < head_dim))
    stat_offsets = seq * stride_mb + q_heads * stride_mh + split
    tl.store(partial_max_ptr + stat_offsets, m_i, mask=row_mask)
    tl.store(partial_sum_ptr + stat_offsets, l_i, mask=row_mask)


@triton.jit
def _decode_reduce_kernel(
    partial_out_ptr, partial_max_ptr, partial_sum_ptr, seq_lens_ptr, out_ptr,
    head_dim, num_splits,
    stride_pb, stride_ph, stride_ps, stride_mb, stride_mh,
    stride_ot, stride_oh,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, PARTITION_SIZE: tl.constexpr, INTERPRETED: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + seq)
    num_used_splits = tl.minimum(tl.cdiv(seq_len, PARTITION_SIZE), num_splits)
    splits = tl.arange(0, BLOCK_S)
    dims = tl.arange(0, BLOCK_D)
    split_mask = splits < num_used_splits
    stat_offsets = seq * stride_mb + head * stride_mh + splits
    m = tl.load(partial_max_ptr + stat_offsets, mask=split_mask, other=float("-inf"))
    l = tl.load(partial_sum_ptr + stat_offsets, mask=split_mask, other=0.0)
    m_max = tl.max(m, axis=0)
    weights = l * tl.exp2(m - tl.where(m_max > float("-inf"), m_max, 0.0))  # 0 on masked splits
    partial_ptrs = partial_out_ptr + seq * stride_pb + head * stride_ph + splits[:, None] * stride_ps + dims[None, :]
    partial = tl.load(partial_ptrs, mask=split_mask[:, None] & (dims[None, :] < head_dim), other=0.0)
    total = tl.sum(weights, axis=0)
    out = tl.sum(weights[:, None] * partial, axis=0) / tl.where(total > 0, total, 1.0)
    out = cast_to(out, out_ptr.dtype.element_ty, INTERPRETED)
    tl.store(out_ptr + seq * stride_ot + head * stride_oh + dims, out, mask=dims < head_dim)


def paged_decode_attention(query: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, max_seq_len: int, scale: float | None = None,
                           partition_size: int = DEFAULT_PARTITION_SIZE,
                           out: torch.Tensor | None = None) -> torch.Tensor:
    """query [B, Hq, D] (one token per sequence) over its first seq_lens[b] cached tokens.

    block_tables [B, max_blocks] int32, seq_lens [B] int32 (>= 1), max_seq_len >= max(seq_lens)
    on the host (sizes the grid without a device sync). Returns out [B, Hq, D] in query's dtype.
    """
    _check_args(query, kv_cache, block_tables, seq_lens, max_seq_len, partition_size, out)
    check_launchable(_decode_partial_kernel, query.device)
    num_seqs, num_q_heads, head_dim = query.shape
    num_kv_heads = kv_cache.shape[3]
    if out is None:
        out = torch.empty_like(query)
    if num_seqs == 0 or max_seq_len == 0:
        return out
    group = num_q_heads // num_kv_heads
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_n = min(_block_n(query.dtype, block_d), partition_size)
    num_splits = triton.cdiv(max_seq_len, partition_size)
    partial_out = torch.empty(num_seqs, num_q_heads, num_splits, block_d, dtype=torch.float32, device=query.device)
    partial_max = torch.empty(num_seqs, num_q_heads, num_splits, dtype=torch.float32, device=query.device)
    partial_sum = torch.empty_like(partial_max)
    scale = head_dim ** -0.5 if scale is None else scale
    _decode_partial_kernel[(num_seqs, num_kv_heads, num_splits)](
        query, kv_cache, block_tables, seq_lens, partial_out, partial_max, partial_sum,
        scale * LOG2_E, head_dim, kv_cache.shape[2],
        query.stride(0), query.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        block_tables.stride(0),
        partial_out.stride(0), partial_out.stride(1), partial_out.stride(2),
        partial_max.stride(0), partial_max.stride(1),
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n, BLOCK_D=block_d,
        PARTITION_SIZE=partition_size, QUANTIZED=is_int8(kv_cache), INTERPRETED=is_interpreted(_decode_partial_kernel),
        num_stages=2,
    )
    _decode_reduce_kernel[(num_seqs, num_q_heads)](
        partial_out, partial_max, partial_sum, seq_lens, out,
        head_dim, num_splits,
        partial_out.stride(0), partial_out.stride(1), partial_out.stride(2),
        partial_max.stride(0), partial_max.stride(1),
        out.stride(0), out.stride(1),
        BLOCK_S=max(2, triton.next_power_of_2(num_splits)), BLOCK_D=block_d, PARTITION_SIZE=partition_size,
        INTERPRETED=is_interpreted(_decode_reduce_kernel),
    )
    return out


def _block_n(dtype: torch.dtype, block_d: int) -> int:
    """Keys per tile. Two K/V buffers (num_stages=2) of [64, 128] 16-bit tiles take 64 KB of shared
    memory; fp32 tiles that wide are halved to stay near that."""
    return 32 if dtype == torch.float32 and block_d > 64 else 64


def paged_decode_attention_reference(query: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                                     seq_lens: torch.Tensor, max_seq_len: int, scale: float | None = None,
                                     partition_size: int = DEFAULT_PARTITION_SIZE,
                                     out: torch.Tensor | None = None) -> torch.Tensor:
    """The contract in plain torch (fp32 softmax); max_seq_len and partition_size are unused."""
    num_seqs, num_q_heads, head_dim = query.shape
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    group = num_q_heads // num_kv_heads
    scale = head_dim ** -0.5 if scale is None else scale
    result = torch.empty_like(query) if out is None else out
    flat = kv_cache.view(2, -1, num_kv_heads, kv_cache.shape[4])
    for seq, seq_len in enumerate(seq_lens.tolist()):
        positions = torch.arange(seq_len, device=query.device)
        slots = block_tables[seq, positions // block_size].long() * block_size + positions % block_size
        # an int8 cache's rows as the kernel reads them: dequantized, rounded to the query's dtype
        keys = from_cache_rows(flat[0][slots], query.dtype).float().repeat_interleave(group, dim=1)  # [L, Hq, D]
        values = from_cache_rows(flat[1][slots], query.dtype).float().repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,lhd->hl", query[seq].float(), keys) * scale
        result[seq] = torch.einsum("hl,lhd->hd", torch.softmax(scores, dim=-1), values).to(query.dtype)
    return result


def _check_args(query: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                seq_lens: torch.Tensor, max_seq_len: int, partition_size: int,
                out: torch.Tensor | None) -> None:
    check_ndim("query", query, 3, "[num_seqs, num_q_heads, head_dim]")
    check_dtype("query", query, FLOAT_DTYPES)
    check_last_dim_contiguous("query", query)
    check_kv_cache(kv_cache, head_dim=query.shape[2])
    if query.shape[1] % kv_cache.shape[3]:
        raise ValueError(f"num_q_heads ({query.shape[1]}) must be a multiple of num_kv_heads ({kv_cache.shape[3]})")
    check_ndim("block_tables", block_tables, 2, "[num_seqs, max_blocks_per_seq]")
    check_dtype("block_tables", block_tables, (torch.int32,))
    check_last_dim_contiguous("block_tables", block_tables)
    check_ndim("seq_lens", seq_lens, 1, "[num_seqs]")
    check_dtype("seq_lens", seq_lens, (torch.int32,))
    check_contiguous("seq_lens", seq_lens)
    if block_tables.shape[0] < query.shape[0] or seq_lens.shape[0] != query.shape[0]:
        raise ValueError(f"{query.shape[0]} queries need as many seq_lens (got {seq_lens.shape[0]}) "
                         f"and block table rows (got {block_tables.shape[0]})")
    if max_seq_len > block_tables.shape[1] * kv_cache.shape[2]:
        raise ValueError(f"max_seq_len {max_seq_len} exceeds the block table's capacity "
                         f"({block_tables.shape[1]} blocks x {kv_cache.shape[2]} tokens)")
    if partition_size < 16 or partition_size & (partition_size - 1):
        raise ValueError(f"partition_size must be a power of two >= 16, got {partition_size}")
    if out is not None:
        if out.shape != query.shape or out.dtype != query.dtype:
            raise ValueError(f"out must match query: shape {tuple(query.shape)} dtype {query.dtype}, "
                             f"got {tuple(out.shape)} {out.dtype}")
        check_last_dim_contiguous("out", out)
    check_same_device(query=query, kv_cache=kv_cache, block_tables=block_tables, seq_lens=seq_lens)
