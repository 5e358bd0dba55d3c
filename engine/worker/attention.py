"""Paged attention: the metadata one step shares across layers, and the torch backend.

KV cache layout (one tensor per layer), shared with the Triton kernels in engine/kernels/:

    kv_cache[layer]: [2, num_blocks, block_size, num_kv_heads, head_dim]   (0 = K, 1 = V)
    slot = block_id * block_size + offset_in_block

The flattened batch puts decode sequences (one query token each) first, then prefill chunks:

    tokens:  | d0 | d1 | ... | d{D-1} | p0 chunk ...... | p1 chunk ... |
    seqs:      0    1          D-1      D                 D+1
    query_start_loc[i] .. query_start_loc[i+1] are sequence i's rows.
    A chunk of q tokens with seq_len L covers absolute positions L-q .. L-1; token j of it
    attends to positions 0 .. L-q+j (its paged context, then causally within the chunk).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(slots=True)
class AttentionMetadata:
    """Everything attention needs about one step's batch; built once, used by every layer."""

    slot_mapping: torch.Tensor  # [num_tokens] int64: where each token's K/V is written
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32, cumulative query lengths
    seq_lens: torch.Tensor  # [num_seqs] int32: context length including this step's tokens
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32, padded with 0
    num_decodes: int  # sequences 0 .. num_decodes-1 have exactly one query token
    max_query_len: int
    max_seq_len: int
    block_size: int
    # Host-side copies, so the torch path never syncs on device values.
    query_start_loc_cpu: list[int]
    seq_lens_cpu: list[int]
    # Torch-path helpers, built lazily by the backend and reused across layers.
    cache: dict | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)


class AttentionBackend(Protocol):
    """Writes this step's K/V into the paged cache, then attends each query over its context."""

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """query [T, Hq, D], key/value [T, Hkv, D], kv_cache as above -> output [T, Hq, D]."""
        ...


class TorchAttentionBackend:
    """CPU path: gather each sequence's context through its block table with index_select, then
    matmul-softmax-matmul.

    PERF (measured on the 2-core dev machine, bf16, 64 sequences x 512 context, one layer):
    scaled_dot_product_attention with one query and enable_gqa took ~14 ms; advanced indexing
    (cache[slots]) gathered 12x slower than index_select; a matmul over a permuted, non-contiguous
    K was ~10x slower than over a contiguous one.  So decodes gather K/V as [B, L, Hkv * D] (one
    contiguous row per token) and multiply by a block-diagonal query [B, Hq, Hkv * D] whose
    off-diagonal head blocks are zero: Hkv times the FLOPs of the ideal product, but every operand
    stays contiguous and the whole batch is two batched matmuls (~3 ms at that shape).
    """

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        write_kv_cache(key, value, kv_cache, meta.slot_mapping)
        if meta.cache is None:
            meta.cache = {}
        output = torch.empty_like(query)
        num_decode_tokens = meta.num_decodes
        if num_decode_tokens:
            output[:num_decode_tokens] = self._decode(query[:num_decode_tokens], kv_cache, meta)
        for seq in range(meta.num_decodes, meta.num_seqs):
            start, end = meta.query_start_loc_cpu[seq], meta.query_start_loc_cpu[seq + 1]
            output[start:end] = self._prefill(query[start:end], kv_cache, meta, seq)
        return output

    def _decode(self, query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        slots, bias = _decode_gather_plan(meta)
        num_seqs, num_q_heads, head_dim = query.shape
        num_kv_heads = kv_cache.shape[3]
        group = num_q_heads // num_kv_heads
        context_len = bias.shape[-1]
        flat = kv_cache.view(2, -1, num_kv_heads * head_dim)
        keys = flat[0].index_select(0, slots).view(num_seqs, context_len, num_kv_heads * head_dim)
        values = flat[1].index_select(0, slots).view(num_seqs, context_len, num_kv_heads * head_dim)
        q = query.view(num_seqs, num_kv_heads, group, 1, head_dim) * head_dim ** -0.5
        eye = torch.eye(num_kv_heads, dtype=query.dtype, device=query.device).view(1, num_kv_heads, 1, num_kv_heads, 1)
        q_block_diagonal = (q * eye).view(num_seqs, num_q_heads, num_kv_heads * head_dim)
        scores = torch.matmul(q_block_diagonal, keys.transpose(1, 2)).float() + bias  # [B, Hq, L]
        probs = torch.softmax(scores, dim=-1).to(values.dtype)
        out = torch.matmul(probs, values).view(num_seqs, num_kv_heads, group, num_kv_heads, head_dim)
        # Keep each query head's own KV head: the diagonal of (query kv head, value kv head).
        out = torch.diagonal(out, dim1=1, dim2=3)  # [B, G, D, Hkv]
        return out.permute(0, 3, 1, 2).reshape(num_seqs, num_q_heads, head_dim)

    def _prefill(self, query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                 seq: int) -> torch.Tensor:
        num_query, num_q_heads, head_dim = query.shape
        num_kv_heads = kv_cache.shape[3]
        group = num_q_heads // num_kv_heads
        seq_len = meta.seq_lens_cpu[seq]
        slots = _context_slots(meta, seq, seq_len)
        flat = kv_cache.view(2, -1, num_kv_heads, head_dim)
        keys = flat[0].index_select(0, slots).transpose(0, 1).contiguous()  # [Hkv, L, D]
        values = flat[1].index_select(0, slots).transpose(0, 1).contiguous()
        q = query.view(num_query, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)
        q = q.reshape(num_kv_heads, group * num_query, head_dim) * head_dim ** -0.5
        scores = torch.matmul(q, keys.transpose(1, 2)).float().view(num_kv_heads, group, num_query, seq_len)
        scores = scores + _causal_bias(num_query, seq_len, scores.device)
        probs = torch.softmax(scores, dim=-1).to(values.dtype).view(num_kv_heads, group * num_query, seq_len)
        out = torch.matmul(probs, values).view(num_kv_heads, group, num_query, head_dim)
        return out.permute(2, 0, 1, 3).reshape(num_query, num_q_heads, head_dim)


def write_kv_cache(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """Store this step's K/V rows at their slots (the reference for the Triton KV-write kernel)."""
    num_kv_heads, head_dim = kv_cache.shape[3], kv_cache.shape[4]
    flat = kv_cache.view(2, -1, num_kv_heads, head_dim)
    flat[0].index_copy_(0, slot_mapping, key.to(kv_cache.dtype))
    flat[1].index_copy_(0, slot_mapping, value.to(kv_cache.dtype))


def _context_slots(meta: AttentionMetadata, seq: int, seq_len: int) -> torch.Tensor:
    positions = torch.arange(seq_len, device=meta.block_tables.device)
    blocks = meta.block_tables[seq, positions // meta.block_size].long()
    return blocks * meta.block_size + positions % meta.block_size


def _decode_gather_plan(meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
    """Slots [B * L] of every decode sequence's context, padded to the longest, and the additive
    mask [B, 1, L] (-inf on padding).  Built once per step, shared by all layers."""
    plan = meta.cache.get("decode")
    if plan is None:
        num_decodes = meta.num_decodes
        seq_lens = meta.seq_lens[:num_decodes].long()
        max_len = int(max(meta.seq_lens_cpu[:num_decodes]))
        positions = torch.arange(max_len, device=seq_lens.device)
        valid = positions[None, :] < seq_lens[:, None]
        block_index = (positions // meta.block_size).clamp(max=meta.block_tables.shape[1] - 1)
        blocks = meta.block_tables[:num_decodes][:, block_index].long()
        slots = torch.where(valid, blocks * meta.block_size + positions % meta.block_size, 0)
        bias = torch.zeros(valid.shape, dtype=torch.float32, device=seq_lens.device)
        bias.masked_fill_(~valid, float("-inf"))
        plan = (slots.view(-1), bias[:, None, :])
        meta.cache["decode"] = plan
    return plan


def _causal_bias(num_query: int, seq_len: int, device: torch.device) -> torch.Tensor:
    """[num_query, seq_len] additive mask: query j sees keys 0 .. seq_len - num_query + j."""
    query_pos = torch.arange(seq_len - num_query, seq_len, device=device)
    key_pos = torch.arange(seq_len, device=device)
    bias = torch.zeros(num_query, seq_len, dtype=torch.float32, device=device)
    return bias.masked_fill_(key_pos[None, :] > query_pos[:, None], float("-inf"))
