"""Paged prefill attention for chunked prefill: ragged query chunks, one launch for the batch.

Sequence s owns query rows query_start_loc[s] .. query_start_loc[s+1] of the flattened batch.
A chunk of q tokens with seq_len L sits at absolute positions L-q .. L-1 (its K/V already written
to the cache), so row j attends to the paged context and causally within the chunk:

    key positions:  0 ............ L-q-1 | L-q ...... L-q+j | ... L-1
                    paged context        | chunk, causal    | masked for row j

Grid (num_seqs, cdiv(max_query_len, BLOCK_M), num_q_heads): a program owns BLOCK_M rows of one
query head and streams the keys it can see (0 .. L-q + its last row) through an online softmax.
Programs past the end of their chunk run no iterations and store nothing.
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


@triton.jit
def _prefill_kernel(
    query_ptr, cache_ptr, block_tables_ptr, seq_lens_ptr, query_start_loc_ptr, out_ptr,
    qk_scale, head_dim, block_size,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kv, stride_cb, stride_cs, stride_ch,
    stride_bt,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    QUANTIZED: tl.constexpr, INTERPRETED: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    q_block = tl.program_id(1)
    head = tl.program_id(2)
    kv_head = head // GROUP
    query_start = tl.load(query_start_loc_ptr + seq)
    query_len = tl.load(query_start_loc_ptr + seq + 1) - query_start
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - query_len

    rows = q_block * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_mask = (rows[:, None] < query_len) & (dims[None, :] < head_dim)
    tokens = (query_start + rows).to(tl.int64)
    q = tl.load(query_ptr + tokens[:, None] * stride_qt + head * stride_qh + dims[None, :], mask=row_mask, other=0.0)

    # Keys visible to this tile: 0 .. context_len + its last row; none past the chunk's end.
    num_tile_rows = tl.minimum(tl.maximum(query_len - q_block * BLOCK_M, 0), BLOCK_M)
    kv_end = tl.where(num_tile_rows > 0, context_len + q_block * BLOCK_M + num_tile_rows, 0)
    last_visible = context_len + rows  # [BLOCK_M] causal limit per row

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # finite: fully masked rows stay NaN-free
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_base = cache_ptr + kv_head * stride_ch
    for start in range(0, kv_end, BLOCK_N):
        positions = start + tl.arange(0, BLOCK_N)
        valid = positions < kv_end
        block_ids = tl.load(block_tables_ptr + seq * stride_bt + positions // block_size, mask=valid, other=0)
        # int64 before the multiply: block_id * stride_cb passes 2^31 elements in a large cache.
        row_offsets = block_ids.to(tl.int64) * stride_cb + (positions % block_size) * stride_cs
        k = load_kv_tile(k_base, row_offsets, dims, valid, head_dim, q.dtype, QUANTIZED, INTERPRETED)
        scores = mma(q, tl.trans(k), INTERPRETED) * qk_scale  # [BLOCK_M, BLOCK_N]
        visible = (positions[None, :] <= last_visible[:, None]) & valid[None, :]
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = load_kv_tile(k_base + stride_kv, row_offsets, dims, valid, head_dim, q.dtype, QUANTIZED, INTERPRETED)
        acc = acc * alpha[:, None] + mma(cast_to(p, v.dtype, INTERPRETED), v, INTERPRETED)
        m_i = m_new

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + tokens[:, None] * stride_ot + head * stride_oh + dims[None, :],
             cast_to(out, out_ptr.dtype.element_ty, INTERPRETED), mask=row_mask)


def paged_prefill_attention(query: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                            seq_lens: torch.Tensor, query_start_loc: torch.Tensor, max_query_len: int,
                            scale: float | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """query [T, Hq, D]; sequence s's rows are query_start_loc[s] .. query_start_loc[s+1] (int32,
    [S+1]), its context seq_lens[s] (int32, [S], including the chunk, whose K/V is already in the
    cache), its blocks block_tables[s] (int32). max_query_len (host) >= every chunk's length.

    Returns out [T, Hq, D] in query's dtype; rows no sequence covers are left as they were.
    """
    _check_args(query, kv_cache, block_tables, seq_lens, query_start_loc, out)
    check_launchable(_prefill_kernel, query.device)
    num_tokens, num_q_heads, head_dim = query.shape
    num_seqs = seq_lens.shape[0]
    if out is None:
        out = torch.empty_like(query)
    if num_seqs == 0 or max_query_len == 0 or num_tokens == 0:
        return out
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_m, block_n = _tile_shape(query.dtype, block_d, max_query_len)
    grid = (num_seqs, triton.cdiv(max_query_len, block_m), num_q_heads)
    scale = head_dim ** -0.5 if scale is None else scale
    _prefill_kernel[grid](
        query, kv_cache, block_tables, seq_lens, query_start_loc, out,
        scale * LOG2_E, head_dim, kv_cache.shape[2],
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        block_tables.stride(0),
        GROUP=num_q_heads // kv_cache.shape[3], BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        QUANTIZED=is_int8(kv_cache), INTERPRETED=is_interpreted(_prefill_kernel), num_stages=2,
    )
    return out


def _tile_shape(dtype: torch.dtype, block_d: int, max_query_len: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N): 16 query rows when every chunk is that short (decode-like steps), else
    64; fp32 tiles wider than 64 dims are halved so Q plus two K/V buffers (num_stages=2) stay
    under ~100 KB of shared memory."""
    block_m = 16 if max_query_len <= 16 else 64
    if dtype == torch.float32 and block_d > 64:
        return min(block_m, 32), 32
    return block_m, 64


def paged_prefill_attention_reference(query: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                                      seq_lens: torch.Tensor, query_start_loc: torch.Tensor, max_query_len: int,
                                      scale: float | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """The contract in plain torch (fp32 softmax); max_query_len is unused."""
    num_q_heads, head_dim = query.shape[1], query.shape[2]
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    group = num_q_heads // num_kv_heads
    scale = head_dim ** -0.5 if scale is None else scale
    result = torch.empty_like(query) if out is None else out
    flat = kv_cache.view(2, -1, num_kv_heads, kv_cache.shape[4])
    starts = query_start_loc.tolist()
    for seq, seq_len in enumerate(seq_lens.tolist()):
        start, end = starts[seq], starts[seq + 1]
        if end == start:
            continue
        positions = torch.arange(seq_len, device=query.device)
        slots = block_tables[seq, positions // block_size].long() * block_size + positions % block_size
        # an int8 cache's rows as the kernel reads them: dequantized, rounded to the query's dtype
        keys = from_cache_rows(flat[0][slots], query.dtype).float().repeat_interleave(group, dim=1)  # [L, Hq, D]
        values = from_cache_rows(flat[1][slots], query.dtype).float().repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,lhd->hql", query[start:end].float(), keys) * scale
        query_positions = torch.arange(seq_len - (end - start), seq_len, device=query.device)
        scores.masked_fill_(positions[None, None, :] > query_positions[None, :, None], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        result[start:end] = torch.einsum("hql,lhd->qhd", probs, values).to(query.dtype)
    return result


def _check_args(query: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                seq_lens: torch.Tensor, query_start_loc: torch.Tensor, out: torch.Tensor | None) -> None:
    check_ndim("query", query, 3, "[num_tokens, num_q_heads, head_dim]")
    check_dtype("query", query, FLOAT_DTYPES)
    check_last_dim_contiguous("query", query)
    check_kv_cache(kv_cache, head_dim=query.shape[2])
    if query.shape[1] % kv_cache.shape[3]:
        raise ValueError(f"num_q_heads ({query.shape[1]}) must be a multiple of num_kv_heads ({kv_cache.shape[3]})")
    check_ndim("block_tables", block_tables, 2, "[num_seqs, max_blocks_per_seq]")
    check_dtype("block_tables", block_tables, (torch.int32,))
    check_last_dim_contiguous("block_tables", block_tables)
    for name, tensor in (("seq_lens", seq_lens), ("query_start_loc", query_start_loc)):
        check_ndim(name, tensor, 1, "(1-D)")
        check_dtype(name, tensor, (torch.int32,))
        check_contiguous(name, tensor)
    num_seqs = seq_lens.shape[0]
    if query_start_loc.shape[0] != num_seqs + 1 or block_tables.shape[0] < num_seqs:
        raise ValueError(f"{num_seqs} sequences need query_start_loc of {num_seqs + 1} entries (got "
                         f"{query_start_loc.shape[0]}) and as many block table rows (got {block_tables.shape[0]})")
    if out is not None:
        if out.shape != query.shape or out.dtype != query.dtype:
            raise ValueError(f"out must match query: shape {tuple(query.shape)} dtype {query.dtype}, "
                             f"got {tuple(out.shape)} {out.dtype}")
        check_last_dim_contiguous("out", out)
    check_same_device(query=query, kv_cache=kv_cache, block_tables=block_tables, seq_lens=seq_lens,
                      query_start_loc=query_start_loc)
