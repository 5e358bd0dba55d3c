"""Attention over the paged KV cache: RoPE on the Q and K heads of the fused QKV projection's
output, then the attention backend (which writes this step's K/V and attends)."""

from __future__ import annotations

import torch
from torch import nn

from engine.kernels.cpu import layer_ops
from engine.model.attention_backends.metadata import AttentionBackend, grouped_from_rank_major
from engine.model.compute_plan import ComputePlan
from engine.model.forward_batch import ForwardBatch
from engine.model.layers.prompt_pruning import WindowScorer
from engine.model.layers.rotary import apply_rotary


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, backend: AttentionBackend,
                 plan: ComputePlan, rank_major: bool = False, scorer: WindowScorer | None = None) -> None:
        """`rank_major`: query heads come (and go) in an elastic model's rank-major slots, slot
        r * Hkv + g holding KV group g's r-th head (a level keeps a prefix of them); the backend
        takes them so (AttentionBackend.forward) and the prompt-pruning scorer regrouped.
        `scorer`: this is a score layer of prompt pruning (engine/model/layers/prompt_pruning.py)."""
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.backend = backend
        self.native_rope = plan.native_ops
        self.rank_major = rank_major
        self.scorer = scorer

    def forward(self, qkv: torch.Tensor, kv_cache: torch.Tensor, batch: ForwardBatch,
                group_heads: torch.Tensor | None = None, ranks: int | None = None,
                out: torch.Tensor | None = None) -> torch.Tensor:
        """qkv [T, (Hq + 2 Hkv) D], the fused projection's output (rows may be strided) -> [T, Hq D],
        into `out` if given (rows may be strided).  Elastic models only:
          `group_heads` [T] int32: row t reads only its first group_heads[t] head ranks (the
            backend may skip the rest, AttentionBackend.forward); None: all;
          `ranks`: every row keeps this many head ranks, and qkv carries only their query heads
            (Hq = ranks x Hkv): the other heads are not computed at all."""
        group = self.num_heads // self.num_kv_heads if ranks is None else ranks
        num_heads = group * self.num_kv_heads
        q, k, v = self._rotated_heads(qkv, batch, num_heads)
        num_tokens = qkv.shape[0]
        heads = self.backend.forward(q, k, v, kv_cache, batch.attention, group_heads, rank_major=self.rank_major)
        if self.scorer is not None and batch.kept is not None:  # after the backend wrote this step's K
            self.scorer.add_scores(grouped_from_rank_major(q, self.num_kv_heads) if self.rank_major else q,
                                   kv_cache, batch)
        if out is None:
            return heads.reshape(num_tokens, num_heads * self.head_dim)
        out.view(num_tokens, *heads.shape[1:]).copy_(heads)
        return out

    def _rotated_heads(self, qkv: torch.Tensor, batch: ForwardBatch, num_heads: int
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        num_tokens, head_dim = qkv.shape[0], self.head_dim
        heads = qkv.view(num_tokens, num_heads + 2 * self.num_kv_heads, head_dim)
        q = heads[:, :num_heads]
        k = heads[:, num_heads: num_heads + self.num_kv_heads]
        v = heads[:, num_heads + self.num_kv_heads:]
        rope = batch.rope
        if self.native_rope:
            # Q and K heads are adjacent in each row: one call rotates both, in place.
            layer_ops.rotary_embedding_(heads[:, : num_heads + self.num_kv_heads], rope.cos, rope.sin)
            return q, k, v
        return apply_rotary(q, *rope.full()), apply_rotary(k, *rope.full()), v

    __call__ = forward  # PERF: skips nn.Module.__call__, see engine/model/layers/__init__.py
