"""The prune layer: which prompt tokens go on past layer l*, scored by the model's own attention.

One stage, as FastKV does (a one-stage LazyLLM): every prompt token runs layers [0, l*); at the
step that computes the prompt's last chunk (its stage-B step, engine/prompt_pruning.py), the last
`window` prompt queries of the score layers [l* - n, l*) attend over the whole prompt, and

    score(p)  = sum over score layers, heads and window queries of softmax(q k_p / sqrt(D))
    pooled(p) = max of score over [p - pool // 2, p + pool // 2]    (a span survives whole:
                                                                     every digit of a pass key)
    kept      = the first num_sink_tokens | the top-pooled middle tokens | the window
                0                         S                               P - window        P

at their original positions (their K was rotated there in group A; RoPE of the deep layers
reads `positions`).  Ties go to the earlier position (a stable sort), so the choice is a function
of the prompt's KV.  Scoring "random" is the same mechanism with seeded uniform scores (no
pooling): random dropping, the baseline the attention score must beat.

PERF: the score is attention probabilities, which the fused kernels never materialize; it costs
window x P per head and layer, computed here in fp32 for the few score layers only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.model.forward_batch import ForwardBatch, KeptRows, PromptSelection

class WindowScorer:
    """Adds one score layer's window attention to the batch's selections (Attention calls it
    after the layer's K/V are written)."""

    def add_scores(self, query: torch.Tensor, kv_cache: torch.Tensor, kept: KeptRows) -> None:
        """query [T, Hq, D] rotated, KV head h // (Hq / Hkv) serving head h; kv_cache one layer's."""
        for selection in kept.selections:
            if selection.kept_positions is None and selection.scoring == "attention":
                scores = _window_attention(query, kv_cache, selection)
                selection.scores = scores if selection.scores is None else selection.scores.add_(scores)


def _window_attention(query: torch.Tensor, kv_cache: torch.Tensor, selection: PromptSelection) -> torch.Tensor:
    """[P] fp32: the window queries' attention on each prompt position, summed over heads."""
    start, end = selection.window_rows
    num_window, num_q_heads, head_dim = end - start, query.shape[1], query.shape[2]
    num_kv_heads, num_prompt = kv_cache.shape[3], selection.num_prompt_tokens
    keys = kv_cache[0].view(-1, num_kv_heads, head_dim).index_select(0, selection.context_slots)  # [P, Hkv, D]
    q = query[start:end].float().view(num_window, num_kv_heads, num_q_heads // num_kv_heads, head_dim)
    logits = torch.einsum("wkgd,pkd->kgwp", q, keys.float()) * head_dim ** -0.5
    # Window query j sits at position P - window + j and sees positions up to its own.
    query_positions = torch.arange(num_prompt - num_window, num_prompt, device=query.device)
    future = torch.arange(num_prompt, device=query.device)[None, :] > query_positions[:, None]
    logits.masked_fill_(future, float("-inf"))
    return torch.softmax(logits, dim=-1).sum(dim=(0, 1, 2))


class PromptPruner:
    """The prune layer's choice and the batch's switch to group B's rows."""

    def __init__(self, prune_layer: int, num_score_layers: int, num_sink_tokens: int, pool_size: int) -> None:
        self.prune_layer = prune_layer
        self.score_layers = range(max(0, prune_layer - num_score_layers), prune_layer)
        self.num_sink_tokens, self.pool_size = num_sink_tokens, pool_size

    def scorer_for(self, layer_index: int) -> WindowScorer | None:
        return WindowScorer() if layer_index in self.score_layers else None

    def __call__(self, x: torch.Tensor, residual: torch.Tensor, batch: ForwardBatch,
                 hidden_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """At layer l*: store every row's residual stream in group A's hidden cache, choose the
        kept positions, and hand on group B's rows (x, residual) with the batch switched to them."""
        kept = batch.kept
        hidden_cache.index_copy_(0, batch.attention.slot_mapping, (x + residual).to(hidden_cache.dtype))
        for selection in kept.selections:
            if selection.kept_positions is None:
                selection.kept_positions = self.choose(selection)
            start = selection.kept_rows_start
            kept.positions[start: start + selection.num_kept] = selection.kept_positions
        if kept.source_rows is not None:
            x, residual = _gather_rows(x, residual, kept, hidden_cache)
        batch.enter_kept_rows()
        return x, residual

    def choose(self, selection: PromptSelection) -> torch.Tensor:
        """[K] ascending: sinks, the top-scored middle, the window (module docstring)."""
        num_prompt, num_sinks = selection.num_prompt_tokens, min(self.num_sink_tokens, selection.num_prompt_tokens)
        middle_end = num_prompt - selection.window
        num_middle = selection.num_kept - num_sinks - selection.window
        scores = self._scores(selection)[num_sinks:middle_end]
        top = torch.argsort(scores, descending=True, stable=True)[:num_middle] + num_sinks
        device = scores.device
        return torch.cat([torch.arange(num_sinks, device=device), torch.sort(top).values,
                          torch.arange(middle_end, num_prompt, device=device)])

    def _scores(self, selection: PromptSelection) -> torch.Tensor:
        if selection.scoring == "random":
            generator = torch.Generator().manual_seed(selection.seed)
            return torch.rand(selection.num_prompt_tokens, generator=generator).to(selection.context_slots.device)
        pooled = F.max_pool1d(selection.scores[None, None], self.pool_size, stride=1, padding=self.pool_size // 2)
        return pooled[0, 0]


def _gather_rows(x: torch.Tensor, residual: torch.Tensor, kept: KeptRows,
                 hidden_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Group B's (x, residual): this step's rows as they are, and kept prompt rows from the
    hidden cache as (stream, 0), so a row that stays keeps its exact values."""
    slots = [s.context_slots.index_select(0, s.kept_positions) for s in kept.selections]
    if slots:
        cached = hidden_cache.index_select(0, torch.cat(slots)).to(x.dtype)
        x = torch.cat([x, cached])
        residual = torch.cat([residual, torch.zeros_like(cached)])
    return x.index_select(0, kept.source_rows), residual.index_select(0, kept.source_rows)
