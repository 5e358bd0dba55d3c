"""The torch attention backend: the reference every other backend is tested against, and the
CPU path where the C++ kernels do not run.  Layout and batch order: see metadata.py."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.kernels.kv_cache_format import from_cache_rows, head_dim_of, to_cache_rows
from engine.model.attention_backends.metadata import AttentionMetadata, forward_rank_major_as_grouped


class TorchAttentionBackend:
    """CPU path: gather each sequence's context through its block table with index_select, then
    matmul-softmax-matmul for decodes and torch's fused (flash) attention for prefill chunks.

    PERF (measured on the 2-core dev machine, bf16, 64 sequences x 580 context, one layer):
    scaled_dot_product_attention with one query and enable_gqa took ~14 ms; advanced indexing
    (cache[slots]) gathered 12x slower than index_select; a matmul over a permuted, non-contiguous
    K was ~10x slower than over a contiguous one.  So decodes gather K/V straight into a
    contiguous head-major [B, Hkv, L, D] (index_select of (slot, head) rows, into buffers reused
    by every layer), then run two batched matmuls with the query heads of a group as rows.
    Scores stay in the model dtype, masked in place: the bf16 matmul has already rounded them, and
    softmax accumulates in fp32 whatever its input, so an fp32 copy, an out-of-place mask add and
    a cast back bought no precision; dropping them took a 512-token chunk over 1,108 tokens of
    context from ~6.3 to ~4.3 ms a layer, with identical outputs.

    Prefill chunks go through scaled_dot_product_attention, whose CPU kernel is a flash attention
    (tiles, fp32 accumulation, no [q, L] score matrix): one layer, 9 query and 3 KV heads of 64,
    bf16, 2 cores, against matmul-softmax-matmul: 512 x 512 1.1 vs 2.9 ms, 512 over 2,048 of
    context 4.3 vs 14.3 ms, a 1,920-token chunk 7.0 vs 63.8 ms (the score matrix no longer fits
    any cache); fp32 outputs agree to 1e-6.
    """

    prefill_attends_level_heads = True

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, meta: AttentionMetadata,
                group_heads: torch.Tensor | None = None, rank_major: bool = False) -> torch.Tensor:
        # group_heads: decode rows compute every head (the reference); a prefill chunk computes
        # only its level's head ranks (its rows share one level), the others' outputs are zeros.
        if rank_major:  # this path reads grouped heads only
            return forward_rank_major_as_grouped(self.forward, query, key, value, kv_cache, meta, group_heads)
        write_kv_cache(key, value, kv_cache, meta.slot_mapping)
        if meta.num_decodes == meta.num_seqs:
            return self._decode(query, kv_cache, meta, group_heads)
        output = torch.empty_like(query)
        num_decode_tokens = meta.num_decodes
        if num_decode_tokens:
            output[:num_decode_tokens] = self._decode(query[:num_decode_tokens], kv_cache, meta, group_heads)
        for seq in range(meta.num_decodes, meta.num_seqs):
            start, end = meta.query_start_loc_cpu[seq], meta.query_start_loc_cpu[seq + 1]
            ranks = None if group_heads is None else int(group_heads[start])
            self._prefill(query[start:end], kv_cache, meta, seq, ranks, out=output[start:end])
        return output

    def _decode(self, query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                group_heads: torch.Tensor | None = None) -> torch.Tensor:
        buckets = _decode_buckets(meta, kv_cache.shape[3], head_dim_of(kv_cache), query.dtype)
        if len(buckets) == 1:
            return self._decode_bucket(query, kv_cache, meta, buckets[0])
        output = torch.empty_like(query)
        for bucket in buckets:
            output.index_copy_(0, bucket.seq_index, self._decode_bucket(query[bucket.seq_index], kv_cache, meta, bucket))
        return output

    def _decode_bucket(self, query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                       bucket: DecodeBucket) -> torch.Tensor:
        num_seqs, num_q_heads, head_dim = query.shape
        num_kv_heads = kv_cache.shape[3]
        group = num_q_heads // num_kv_heads
        context_len = bucket.bias.shape[-1]
        flat = kv_cache.view(2, -1, kv_cache.shape[4])  # one row per (slot, kv head)
        key_buffer, value_buffer = _gather_buffers(meta, bucket.rows.numel(), flat.shape[2], flat.dtype)
        shape = (num_seqs, num_kv_heads, context_len, head_dim)
        keys = from_cache_rows(torch.index_select(flat[0], 0, bucket.rows, out=key_buffer), query.dtype).view(shape)
        values = from_cache_rows(torch.index_select(flat[1], 0, bucket.rows, out=value_buffer), query.dtype).view(shape)
        q = query.view(num_seqs, num_kv_heads, group, head_dim) * head_dim ** -0.5
        scores = torch.matmul(q, keys.transpose(-1, -2)).add_(bucket.bias)  # [B, Hkv, G, L]
        probs = torch.softmax(scores, dim=-1)  # accumulates in fp32 whatever the input dtype
        return torch.matmul(probs, values).view(num_seqs, num_q_heads, head_dim)

    def _prefill(self, query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                 seq: int, ranks: int | None, out: torch.Tensor) -> None:
        """One prefill chunk's attention into `out` [q, Hq, D]; `ranks`: only each KV group's first
        `ranks` query heads are computed (an elastic level's), the other heads' outputs are zeros.

        PERF: at 1,536 tokens attention is about half of a full prefill on a 2-core AVX512-BF16
        CPU without AMX (torch's flash kernel, ~25 ms a layer); levels 55 and 40 keep one head
        rank of three in most layers, so computing only those saves two thirds of it there."""
        num_query, num_q_heads, head_dim = query.shape
        num_kv_heads = kv_cache.shape[3]
        group = num_q_heads // num_kv_heads
        if ranks is not None and ranks < group:
            kept = query.view(num_query, num_kv_heads, group, head_dim)[:, :, :ranks]
            out_heads = out.view(num_query, num_kv_heads, group, head_dim)
            out_heads[:, :, ranks:].zero_()
            out_heads[:, :, :ranks] = self._prefill_heads(
                kept.reshape(num_query, num_kv_heads * ranks, head_dim), kv_cache, meta, seq
            ).view(num_query, num_kv_heads, ranks, head_dim)
            return
        out.copy_(self._prefill_heads(query, kv_cache, meta, seq))

    @staticmethod
    def _prefill_heads(query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                       seq: int) -> torch.Tensor:
        num_query, num_q_heads, head_dim = query.shape
        num_kv_heads = kv_cache.shape[3]
        seq_len = meta.seq_lens_cpu[seq]
        slots = _context_slots(meta, seq, seq_len)
        flat = kv_cache.view(2, -1, num_kv_heads, kv_cache.shape[4])
        keys = from_cache_rows(flat[0].index_select(0, slots), query.dtype).transpose(0, 1)[None]  # [1, Hkv, L, D]
        values = from_cache_rows(flat[1].index_select(0, slots), query.dtype).transpose(0, 1)[None]
        q = query.transpose(0, 1)[None]  # [1, Hq, q, D]; head h reads KV head h // (Hq / Hkv)
        # Keys before the chunk are visible to all its queries; only the chunk's own square is
        # causal (a whole prompt in one chunk: plain causal, no mask tensor).
        mask = None if num_query == seq_len else _visible_mask(meta, num_query, seq_len)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=mask is None,
                                             enable_gqa=num_q_heads != num_kv_heads)
        return out[0].transpose(0, 1)


def write_kv_cache(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """Store this step's K/V rows at their slots, in the cache's format (kv_cache_format.py); the
    reference for the Triton KV-write kernel and the C++ decode layer's write."""
    flat = kv_cache.view(2, -1, kv_cache.shape[3], kv_cache.shape[4])
    flat[0].index_copy_(0, slot_mapping, to_cache_rows(key, kv_cache))
    flat[1].index_copy_(0, slot_mapping, to_cache_rows(value, kv_cache))


def _gather_buffers(meta: AttentionMetadata, num_rows: int, row_size: int,
                    dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V gather destinations, allocated once per step and reused by every layer and bucket
    (each is sliced to the size asked).

    PERF: a fresh 10+ MB tensor per layer costs page faults on first touch (glibc hands large
    blocks back to the kernel on free); reusing one buffer made the decode gather ~4x faster.
    """
    buffers = meta.scratch.gather_buffers
    if buffers is None or buffers[0].shape[0] < num_rows or buffers[0].dtype != dtype:
        buffers = tuple(torch.empty(num_rows, row_size, dtype=dtype, device=meta.slot_mapping.device)
                        for _ in range(2))
        meta.scratch.gather_buffers = buffers
    return buffers[0][:num_rows], buffers[1][:num_rows]


def _context_slots(meta: AttentionMetadata, seq: int, seq_len: int) -> torch.Tensor:
    """Cache slots of a sequence's context in position order, built once per step."""
    slots = meta.scratch.context_slots.get(seq)
    if slots is None:
        positions = torch.arange(seq_len, device=meta.block_tables.device)
        blocks = meta.block_tables[seq, positions // meta.block_size].long()
        slots = meta.scratch.context_slots[seq] = blocks * meta.block_size + positions % meta.block_size
    return slots


def _visible_mask(meta: AttentionMetadata, num_query: int, seq_len: int) -> torch.Tensor:
    """[q, L] bool, True where the chunk's query j (position L - q + j) sees key i; built once
    per step and shape."""
    mask = meta.scratch.visible_masks.get((num_query, seq_len))
    if mask is None:
        mask = meta.scratch.visible_masks[(num_query, seq_len)] = torch.ones(
            num_query, seq_len, dtype=torch.bool, device=meta.block_tables.device).tril_(seq_len - num_query)
    return mask


@dataclass(slots=True)
class DecodeBucket:
    """Decode sequences of similar context length, attended together."""

    seq_index: torch.Tensor  # [n] which decode sequences (rows of the query)
    rows: torch.Tensor  # [n * Hkv * L] cache rows to gather, see _bucket_rows
    bias: torch.Tensor  # [n, 1, 1, L] additive mask in the query's dtype, -inf past each sequence's length


# A bucket's padded size (members x longest context) may exceed its real context by this factor.
MAX_PADDING_RATIO = 1.3
# A bucket's gathered K and V together stay under this many bytes, so the matmuls read them back
# from cache rather than from memory.
MAX_BUCKET_BYTES = 4 << 20


def _decode_buckets(meta: AttentionMetadata, num_kv_heads: int, head_dim: int,
                    dtype: torch.dtype) -> list[DecodeBucket]:
    """Split the decode sequences into buckets of similar length and bounded size, built once
    per step; `dtype`: the query's, which the gathered K/V take.

    PERF: one padded gather over a ragged batch (ShareGPT: contexts from 10 to 1,000 tokens)
    spent most of its time on padding; sorting by length and cutting where padding would pass
    MAX_PADDING_RATIO cut a 64-sequence decode step from 179 to ~80 ms here.  Capping a bucket's
    gather at MAX_BUCKET_BYTES (about 12 sequences of 512 tokens for SmolLM2) then took 64
    sequences at 512 tokens from ~165 to ~135 ms a step: the gathered K/V is still in cache when
    the matmuls read it.
    """
    buckets = meta.scratch.decode_buckets
    if buckets is None:
        lengths = meta.seq_lens_cpu[: meta.num_decodes]
        order = sorted(range(len(lengths)), key=lengths.__getitem__)
        groups: list[list[int]] = [[]]
        total = 0
        for seq in order:  # ascending, so the newcomer is the group's longest
            if groups[-1] and (len(groups[-1]) + 1) * lengths[seq] > MAX_PADDING_RATIO * (total + lengths[seq]):
                groups.append([])
                total = 0
            groups[-1].append(seq)
            total += lengths[seq]
        groups = [chunk for group in groups
                  for chunk in _split_by_bytes(group, lengths, 2 * num_kv_heads * head_dim * dtype.itemsize)]
        if len(groups) == 1:
            groups = [list(range(len(lengths)))]  # keep the batch order: no scatter needed
        buckets = [_bucket(meta, group, num_kv_heads, dtype) for group in groups]
        meta.scratch.decode_buckets = buckets
    return buckets


def _split_by_bytes(group: list[int], lengths: list[int], bytes_per_token: int) -> list[list[int]]:
    """Cut a length-sorted group into runs whose padded K/V gather fits MAX_BUCKET_BYTES."""
    longest = max(lengths[seq] for seq in group)
    size = max(1, MAX_BUCKET_BYTES // (longest * bytes_per_token))
    return [group[i: i + size] for i in range(0, len(group), size)]


def _bucket(meta: AttentionMetadata, seqs: list[int], num_kv_heads: int, dtype: torch.dtype) -> DecodeBucket:
    """Cache rows holding these sequences' contexts, head-major, padded to the longest context
    rounded up to whole blocks.

    Row r of the cache viewed as [num_slots * Hkv, D] is (slot = r // Hkv, kv head = r % Hkv), so
    gathering rows (slot * Hkv + h) in [seq, h, position] order yields K as [n, Hkv, L, D]
    contiguous: the layout the batched matmul wants.
    """
    device = meta.block_tables.device
    seq_index = torch.tensor(seqs, dtype=torch.long, device=device)
    seq_lens = meta.seq_lens[seq_index].long()
    num_blocks = -(-max(meta.seq_lens_cpu[s] for s in seqs) // meta.block_size)
    positions = torch.arange(num_blocks * meta.block_size, device=device)
    blocks = meta.block_tables[seq_index, :num_blocks].long()
    slots = (blocks[:, :, None] * meta.block_size + torch.arange(meta.block_size, device=device)).flatten(1)
    heads = torch.arange(num_kv_heads, device=device)
    rows = slots[:, None, :] * num_kv_heads + heads[None, :, None]  # [n, Hkv, L]
    bias = torch.zeros(len(seqs), positions.numel(), dtype=dtype, device=device)  # 0 and -inf: exact in any dtype
    bias.masked_fill_(positions[None, :] >= seq_lens[:, None], float("-inf"))
    return DecodeBucket(seq_index=seq_index, rows=rows.flatten(), bias=bias[:, None, None, :])

