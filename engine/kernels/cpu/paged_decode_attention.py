"""Decode attention over the paged KV cache in C++ (paged_decode_attention.cpp): the wrapper
that checks arguments and calls the library.

Same contract as the decode half of TorchAttentionBackend (engine/model/attention_backends/torch_backend.py), which is
its reference: one query token per sequence, context = the sequence's first seq_lens[i] slots
through its block table.  It runs the engine's build of the library (native_library.load());
`library=` names another build (native_library.load(isa)), for tests and benchmarks.
"""

from __future__ import annotations

import ctypes

import torch

from engine.kernels.cpu import native_library
from engine.kernels.cpu.native_library import DTYPE_CODES
from engine.kernels.kv_cache_format import head_dim_of, is_int8

# kMaxGroup of paged_decode_attention.cpp, kMaxHeadDim of simd.h
MAX_GROUP = 16
MAX_HEAD_DIM = 256


def supports(kv_cache: torch.Tensor, num_q_heads: int) -> bool:
    """Whether the kernel can serve this cache and model on this machine."""
    return _handles(kv_cache, num_q_heads) and native_library.load() is not None


def _handles(kv_cache: torch.Tensor, num_q_heads: int) -> bool:
    """Whether the kernel handles this cache and model (in every build: head_dim % 16 == 0)."""
    num_kv_heads, head_dim = kv_cache.shape[3], head_dim_of(kv_cache)
    return (kv_cache.device.type == "cpu" and (kv_cache.dtype in DTYPE_CODES or is_int8(kv_cache)) and head_dim % 16 == 0
            and head_dim <= MAX_HEAD_DIM and num_q_heads % num_kv_heads == 0
            and num_q_heads // num_kv_heads <= MAX_GROUP)


def paged_decode_attention(query: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, out: torch.Tensor | None = None, *,
                           group_heads: torch.Tensor | None = None, rank_major: bool = False,
                           library: ctypes.CDLL | None = None) -> torch.Tensor:
    """query [B, Hq, D] (one token per sequence; rows may be strided views),
    kv_cache [2, num_blocks, block_size, Hkv, D] in the query's dtype, or int8 [..., D + 4]
    (engine/kernels/kv_cache_format.py), block_tables [B, max_blocks] int32,
    seq_lens [B] int32 (each >= 1) -> out [B, Hq, D].  Query head h reads KV head h // (Hq / Hkv);
    with `rank_major`, KV head h % Hkv (an elastic model's rank-major slots: slot r * Hkv + g is
    group g's r-th head), the output in the same order.  `group_heads` [B] int32: each sequence
    attends with only the first group_heads[i] query heads of every KV group (an elastic level's
    heads, engine/model/layers/attention.py); the others' outputs are zeros.  None: every head."""
    _check(query, kv_cache, block_tables, seq_lens)
    if group_heads is not None:
        _check_group_heads(group_heads, query.shape[0])
    if out is None:
        out = torch.empty_like(query)
    elif out.shape != query.shape or out.dtype != query.dtype or not out.is_contiguous():
        raise ValueError(f"out must be contiguous {tuple(query.shape)} {query.dtype}, got "
                         f"{tuple(out.shape)} {out.dtype}")
    num_seqs, num_q_heads, head_dim = query.shape
    if num_seqs == 0:
        return out
    if library is None:
        library = native_library.load()
    if library is None:
        raise RuntimeError("the native CPU kernels are not available on this machine (see the log)")
    status = library.paged_decode_attention(
        query.data_ptr(), query.stride(0), kv_cache[0].data_ptr(), kv_cache[1].data_ptr(), block_tables.data_ptr(),
        block_tables.stride(0), seq_lens.data_ptr(),
        0 if group_heads is None else group_heads.data_ptr(), out.data_ptr(), num_seqs, num_q_heads,
        kv_cache.shape[3], head_dim, kv_cache.shape[2], head_dim ** -0.5, DTYPE_CODES[query.dtype],
        torch.get_num_threads(), int(rank_major), int(is_int8(kv_cache)))
    if status != 0:
        raise ValueError("paged_decode_attention: shapes or dtype not supported by the kernel")
    return out


def _check(query: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
           seq_lens: torch.Tensor) -> None:
    if query.dim() != 3 or kv_cache.dim() != 5:
        raise ValueError(f"query must be [B, Hq, D] and kv_cache [2, blocks, block_size, Hkv, D], got "
                         f"{tuple(query.shape)} and {tuple(kv_cache.shape)}")
    if not _handles(kv_cache, query.shape[1]):
        raise ValueError(f"kernel does not support kv_cache {tuple(kv_cache.shape)} {kv_cache.dtype} "
                         f"on {kv_cache.device} with {query.shape[1]} query heads")
    if (query.dtype != kv_cache.dtype and not is_int8(kv_cache)) or query.shape[2] != head_dim_of(kv_cache):
        raise ValueError("query and kv_cache must share dtype (or the cache be int8) and head_dim")
    if query.stride(2) != 1 or query.stride(1) != query.shape[2] or not kv_cache.is_contiguous():
        raise ValueError("query heads must be contiguous (rows may be strided) and kv_cache contiguous")
    if block_tables.dtype != torch.int32 or seq_lens.dtype != torch.int32:
        raise ValueError("block_tables and seq_lens must be int32")
    if block_tables.dim() != 2 or block_tables.stride(1) != 1 or not seq_lens.is_contiguous():
        raise ValueError("block_tables must be 2-D with contiguous rows, seq_lens contiguous")
    if block_tables.shape[0] < query.shape[0] or seq_lens.shape[0] < query.shape[0]:
        raise ValueError("block_tables and seq_lens need a row per query sequence")


def _check_group_heads(group_heads: torch.Tensor, num_seqs: int) -> None:
    # Counts outside [0, group] are clamped by the kernel: no check of the values on this hot path.
    if group_heads.dtype != torch.int32 or group_heads.dim() != 1 or not group_heads.is_contiguous():
        raise ValueError("group_heads must be a contiguous 1-D int32 tensor")
    if group_heads.shape[0] < num_seqs:
        raise ValueError("group_heads needs a count per query sequence")
