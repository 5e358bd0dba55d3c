"""Paged attention: the metadata one step shares across layers, and the backend protocol.

KV cache layout (one tensor per layer), shared with the Triton kernels in engine/kernels/:

    kv_cache[layer]: [2, num_blocks, block_size, num_kv_heads, head_dim]   (0 = K, 1 = V)
    slot = block_id * block_size + offset_in_block

(an int8 cache's rows are head_dim + 4 bytes, the last four the row's scale: engine/kernels/kv_cache_format.py)

The flattened batch puts decode sequences (one query token each) first, then prefill chunks:

    tokens:  | d0 | d1 | ... | d{D-1} | p0 chunk ...... | p1 chunk ... |
    seqs:      0    1          D-1      D                 D+1
    query_start_loc[i] .. query_start_loc[i+1] are sequence i's rows.
    A chunk of q tokens with seq_len L covers absolute positions L-q .. L-1; token j of it
    attends to positions 0 .. L-q+j (its paged context, then causally within the chunk).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch


@dataclass(slots=True)
class TorchAttentionScratch:
    """What the torch path derives from one step's metadata, built on first use by a layer."""

    decode_buckets: list | None = None  # list[DecodeBucket], see torch_backend.py
    gather_buffers: tuple[torch.Tensor, torch.Tensor] | None = None  # K and V gather destinations
    context_slots: dict[int, torch.Tensor] = field(default_factory=dict)  # sequence -> its cache slots
    visible_masks: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)  # (chunk, context) -> visible keys


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
    # Derived once per step by the torch path on first use and reused by every layer (and reset
    # by tests that run one metadata through two backends).
    scratch: TorchAttentionScratch = field(default_factory=lambda: TorchAttentionScratch())

    @property
    def max_decode_seq_len(self) -> int:
        """Longest decode context (sizes the Triton split grid)."""
        return max(self.seq_lens_cpu[: self.num_decodes], default=0)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)


class AttentionBackend(Protocol):
    """Writes this step's K/V into the paged cache, then attends each query over its context."""

    # Whether a prefill chunk attends with only its level's query heads (group_heads) and skips
    # the others; the scheduler prices a level's prefill attention by it.
    prefill_attends_level_heads: bool

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, meta: AttentionMetadata,
                group_heads: torch.Tensor | None = None, rank_major: bool = False) -> torch.Tensor:
        """query [T, Hq, D], key/value [T, Hkv, D], kv_cache as above -> output [T, Hq, D].

        Query head h reads KV head h // (Hq / Hkv); with `rank_major`, KV head h % Hkv (an
        elastic model's rank-major slots, slot r * Hkv + g holding group g's r-th head), and the
        output comes in the same order.  `group_heads` [T] int32 or None: row t reads only the
        outputs of the first group_heads[t] query heads of each KV group (an elastic level's,
        engine/model/layers/attention.py).  A backend may skip the other heads (their outputs
        are then unspecified) or compute them."""
        ...


def grouped_from_rank_major(heads: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[T, Hq, D] in rank-major slots -> grouped order (head g * G + r is group g's r-th), a copy."""
    num_tokens, num_heads, head_dim = heads.shape
    return heads.view(num_tokens, num_heads // num_kv_heads, num_kv_heads, head_dim).transpose(1, 2).reshape(
        heads.shape)


def rank_major_from_grouped(heads: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """The inverse of grouped_from_rank_major, a copy."""
    num_tokens, num_heads, head_dim = heads.shape
    return heads.view(num_tokens, num_kv_heads, num_heads // num_kv_heads, head_dim).transpose(1, 2).reshape(
        heads.shape)


def forward_rank_major_as_grouped(forward: Callable[..., torch.Tensor], query: torch.Tensor, key: torch.Tensor,
                                  value: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                                  group_heads: torch.Tensor | None) -> torch.Tensor:
    """A backend's `forward` that reads grouped heads only, given rank-major ones: the query is
    regrouped before and the output put back in rank-major slots after."""
    num_kv_heads = kv_cache.shape[3]
    grouped = forward(grouped_from_rank_major(query, num_kv_heads), key, value, kv_cache, meta, group_heads)
    return rank_major_from_grouped(grouped, num_kv_heads)
