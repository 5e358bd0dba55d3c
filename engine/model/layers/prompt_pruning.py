"""The prune layers: which prompt tokens go on past each, scored by the model's own attention.

Progressive, within one step (engine/prompt_pruning.py): every prompt token runs layers [0, l_1);
at the step that computes the prompt's last chunk (its stage-B step), at each prune layer l_s the
last `score_window` queries of the candidates (the tokens that reached l_s; the whole prompt at
l_1) attend, in the score layers [l_s - n, l_s), over every candidate, and

    score(i)  = sum over score layers, heads and scoring queries of softmax(q k_i / sqrt(D))
    pooled(i) = max of score over candidates [i - pool // 2, i + pool // 2]    (a span survives
                                                                               whole: every digit
                                                                               of a pass key)
    kept      = the first num_sink_tokens | the top-pooled middle | the window
                0                         S                       C - window        C

at their original positions (their K was rotated there; RoPE of the deep layers reads
`positions`).  Ties go to the earlier candidate (a stable sort), so the choice is a function of the
prompt's KV.  Scoring "random" is the same mechanism with seeded uniform scores (no pooling):
random dropping, the baseline the attention score must beat.

PERF: the score is attention probabilities, which the fused kernels never materialize; it costs
score_window x C per head and layer, computed here in fp32 for the few score layers only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.distributed.group import TensorParallelGroup
from engine.kernels.kv_cache_format import from_cache_rows
from engine.model.forward_batch import ForwardBatch, KeptRows, PromptSelection


class WindowScorer:
    """Adds one score layer's window attention to its stage's selections (Attention calls it
    after the layer's K/V are written)."""

    def __init__(self, stage: int) -> None:
        self.stage = stage  # the selections it scores: batch.kept[stage]'s

    def add_scores(self, query: torch.Tensor, kv_cache: torch.Tensor, batch: ForwardBatch) -> None:
        """query [T, Hq, D] rotated, KV head h // (Hq / Hkv) serving head h; kv_cache one layer's."""
        for selection in self._scoring(batch):
            scores = _window_attention(query, kv_cache, selection)
            selection.scores = scores if selection.scores is None else selection.scores.add_(scores)

    def scores_in(self, batch: ForwardBatch) -> bool:
        """Whether this step has prompts for this layer to score (a step of decodes has none)."""
        return batch.kept is not None and any(True for _ in self._scoring(batch))

    def _scoring(self, batch: ForwardBatch):
        return (selection for selection in batch.kept[self.stage].selections
                if selection.kept_positions is None and selection.scoring == "attention")


def _window_attention(query: torch.Tensor, kv_cache: torch.Tensor, selection: PromptSelection) -> torch.Tensor:
    """[C] fp32: the scoring queries' attention on each candidate, summed over heads."""
    start, end = selection.window_rows
    num_queries, num_q_heads, head_dim = end - start, query.shape[1], query.shape[2]
    num_kv_heads, num_candidates = kv_cache.shape[3], selection.num_candidates
    rows = kv_cache[0].view(-1, num_kv_heads, kv_cache.shape[4]).index_select(0, selection.context_slots)
    keys = from_cache_rows(rows, torch.float32)  # [C, Hkv, D]
    q = query[start:end].float().view(num_queries, num_kv_heads, num_q_heads // num_kv_heads, head_dim)
    logits = torch.einsum("wkgd,pkd->kgwp", q, keys) * head_dim ** -0.5
    # Scoring query j is candidate C - num_queries + j and sees the candidates up to itself.
    query_index = torch.arange(num_candidates - num_queries, num_candidates, device=query.device)
    future = torch.arange(num_candidates, device=query.device)[None, :] > query_index[:, None]
    logits.masked_fill_(future, float("-inf"))
    return torch.softmax(logits, dim=-1).sum(dim=(0, 1, 2))


class PromptPruner:
    """The prune layers' choices and the batch's switch to each deep group's rows."""

    def __init__(self, prune_layers: tuple[int, ...], num_score_layers: int, num_sink_tokens: int,
                 pool_size: int, tp: TensorParallelGroup | None = None) -> None:
        """`tp`: a tensor-parallel rank scores with its own heads; the ranks' sums are all-reduced
        so that every rank keeps the same tokens."""
        self.prune_layers = prune_layers
        self.tp = tp
        # Stage s scores in [l_s - n, l_s), never below the previous prune layer: its score
        # layers run the rows its candidates are.
        bounds = (0, *prune_layers)
        self.score_layers = [range(max(lower, layer - num_score_layers), layer)
                             for lower, layer in zip(bounds, prune_layers)]
        self.num_sink_tokens, self.pool_size = num_sink_tokens, pool_size

    def stage_at(self, layer_index: int) -> int | None:
        """The stage whose prune layer this is (None: not a prune layer)."""
        return self.prune_layers.index(layer_index) if layer_index in self.prune_layers else None

    def scorer_for(self, layer_index: int) -> WindowScorer | None:
        stage = next((s for s, layers in enumerate(self.score_layers) if layer_index in layers), None)
        return None if stage is None else WindowScorer(stage)

    def __call__(self, stage: int, x: torch.Tensor, residual: torch.Tensor, batch: ForwardBatch,
                 hidden_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """At l_{stage + 1}: choose the kept candidates, and hand on the next group's rows (x,
        residual) with the batch switched to them.  The first stage also stores every row's
        residual stream in group 0's hidden cache (what a kept token of an earlier chunk resumes
        from)."""
        kept = batch.kept[stage]
        if stage == 0:
            hidden_cache.index_copy_(0, batch.attention.slot_mapping, (x + residual).to(hidden_cache.dtype))
        for selection in kept.selections:
            indices = self._kept_indices(selection)
            start = selection.kept_rows_start
            kept.positions[start: start + selection.num_kept] = selection.kept_positions
            if stage > 0:
                kept.source_rows[start: start + selection.num_kept] = selection.candidate_rows_start + indices
        if kept.source_rows is not None:
            x, residual = (_gather_first_stage(x, residual, kept, hidden_cache) if stage == 0
                           else (x.index_select(0, kept.source_rows), residual.index_select(0, kept.source_rows)))
        batch.enter_kept_rows(stage)
        return x, residual

    def _kept_indices(self, selection: PromptSelection) -> torch.Tensor:
        """The kept candidates' indices; sets selection.kept_positions where this step chooses."""
        candidates = selection.candidate_positions()
        if selection.kept_positions is not None:  # replayed: the indices of the given positions
            return selection.kept_positions if candidates is None else torch.searchsorted(
                candidates, selection.kept_positions)
        indices = self.choose(selection)
        selection.kept_positions = indices if candidates is None else candidates.index_select(0, indices)
        return indices

    def choose(self, selection: PromptSelection) -> torch.Tensor:
        """[K] ascending candidate indices: sinks, the top-scored middle, the window (module docstring)."""
        num_candidates = selection.num_candidates
        num_sinks = min(self.num_sink_tokens, num_candidates)
        middle_end = num_candidates - selection.window
        num_middle = selection.num_kept - num_sinks - selection.window
        scores = self._scores(selection)[num_sinks:middle_end]
        top = torch.argsort(scores, descending=True, stable=True)[:num_middle] + num_sinks
        device = scores.device
        return torch.cat([torch.arange(num_sinks, device=device), torch.sort(top).values,
                          torch.arange(middle_end, num_candidates, device=device)])

    def _scores(self, selection: PromptSelection) -> torch.Tensor:
        if selection.scoring == "random":
            generator = torch.Generator().manual_seed(selection.seed)
            return torch.rand(selection.num_candidates, generator=generator).to(selection.context_slots.device)
        if self.tp is not None:
            self.tp.all_reduce_(selection.scores)
        pooled = F.max_pool1d(selection.scores[None, None], self.pool_size, stride=1, padding=self.pool_size // 2)
        return pooled[0, 0]


def _gather_first_stage(x: torch.Tensor, residual: torch.Tensor, kept: KeptRows,
                        hidden_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Group 1's (x, residual): this step's rows as they are, and kept prompt rows from the
    hidden cache as (stream, 0), so a row that stays keeps its exact values."""
    slots = [s.context_slots.index_select(0, s.kept_positions) for s in kept.selections]
    if slots:
        cached = hidden_cache.index_select(0, torch.cat(slots)).to(x.dtype)
        x = torch.cat([x, cached])
        residual = torch.cat([residual, torch.zeros_like(cached)])
    return x.index_select(0, kept.source_rows), residual.index_select(0, kept.source_rows)
