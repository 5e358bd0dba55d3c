"""ForwardBatch: one step's batch as every layer of the model sees it.

The runner builds it from a SchedulerOutput; the model hands it, unchanged, to every layer, and
each layer reads what it needs: attention its metadata, RoPE the positions, a linear layer (later)
the rows' per-request settings.  Row layout (what `AttentionMetadata` draws in full):

    rows:      | d0 | d1 | ... | d{D-1} | p0 chunk ...... | p1 chunk ... |
               '-- one row per decode --'-- prefill chunks, in scheduled order --'

Per-row settings (an elastic level, a pruning decision) get typed fields here, one value per
request (`request_ids` order), never a string-keyed dict; a layer that keeps fewer rows says so
here and every later layer and the sampler follow it.

Elastic levels (`ElasticRows`): a step whose rows run different submodels is regrouped, inside
each elastic block, into level order, widest first, so that the rows using any column of a
prefix-ordered weight are a prefix of the rows (engine/model/layers/elastic.py):

    level order:  | level-index-0 rows | level-index-1 rows | ... | last level's rows |
                  0                    rows_upto[0]         rows_upto[1] ...          rows_upto[-1] == num_tokens

Prompt pruning (`KeptRows`, one per stage): layers from prune layer l_s run deep group s's rows
(engine/prompt_pruning.py).  At l_s the pruning layer (engine/model/layers/prompt_pruning.py)
chooses stage s's kept prompt tokens of the requests whose stage-B step this is, then points the
batch's attention, positions, rope, elastic rows, request ids and logits_indices at group s's, so
every later layer and the sampler follow the kept rows.  Group s's rows, per request with any
(request order as above, so decodes stay first), each from the previous group's rows:

    unpruned, or pruned past its prompt:  the same rows as the previous group's
    stage-B step of a pruned request:     | K_s kept prompt rows         | output rows of the chunk |
                                            stage 1: the hidden cache, at  the previous group's rows
                                            the kept positions' slots;
                                            later: the previous group's
                                            rows of the kept candidates
    pruned, still in stage A:             none (the chunk ran only the layers below l_1)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.model.attention_backends.metadata import AttentionMetadata
from engine.model.layers.rotary import RopeTables


@dataclass(slots=True)
class ElasticRows:
    """How one step's rows map to elastic levels (indices into the model's ElasticSpec.levels,
    0 = the full model).  Absent (None on the batch) when every row runs the full model."""

    # Level order -> batch row, and back; None when the batch is already in level order.
    order: torch.Tensor | None  # [num_tokens] int64: level-order row i is batch row order[i]
    inverse: torch.Tensor | None  # [num_tokens] int64: batch row j is level-order row inverse[j]
    rows_upto: tuple[int, ...]  # per level index k: rows at level index <= k (a level-order prefix)
    row_levels: torch.Tensor  # [num_tokens] int64, batch order: each row's level index
    _per_row: dict[tuple[int, ...], torch.Tensor] = field(default_factory=dict)  # per_row's memo

    def per_row(self, per_level: tuple[int, ...]) -> torch.Tensor:
        """[num_tokens] int32, batch order: each row's entry of a per-level-index tuple.  Memoised
        for the step: layers share a few distinct tuples, and an index op costs tens of us."""
        if per_level not in self._per_row:
            table = torch.tensor(per_level, dtype=torch.int32, device=self.row_levels.device)
            self._per_row[per_level] = table[self.row_levels]
        return self._per_row[per_level]

    def to_level_order(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.order is None else x.index_select(0, self.order)

    def to_batch_order(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.inverse is None else x.index_select(0, self.inverse)

    def level_rows(self, level_index: int) -> tuple[int, int]:
        """The level-order row range [start, end) of the rows at exactly this level index."""
        start = self.rows_upto[level_index - 1] if level_index else 0
        return start, self.rows_upto[level_index]

    def level_groups(self) -> list[tuple[int, int, int]]:
        """(level index, start, end) of each level with rows, widest first (level order)."""
        groups = [(index, *self.level_rows(index)) for index in range(len(self.rows_upto))]
        return [group for group in groups if group[2] > group[1]]


@dataclass(slots=True)
class PromptSelection:
    """A request whose stage-B step this is: which of its candidates (the prompt positions that
    reached this stage's prune layer, in position order) go on past it."""

    request_id: str
    # The candidates: at the first stage the prompt (C = P, candidate i is position i); at a later
    # one the previous stage's kept positions (C = K_{s-1}), chosen there (`parent`).
    num_candidates: int  # C
    num_kept: int  # K_s, sinks and window included
    window: int  # the last candidates: always kept
    window_rows: tuple[int, int]  # the previous group's rows [start, end) of the scoring queries (the last ones)
    context_slots: torch.Tensor  # [C] int64: each candidate's cache slot in the previous group
    kept_rows_start: int  # this group's row of the first kept candidate; K_s rows follow
    scoring: str  # "attention" or "random" (the same mechanism with seeded random scores)
    seed: int  # random scoring's seed, a function of the prompt (so a recompute draws the same)
    parent: PromptSelection | None = None  # the previous stage's selection (None at the first)
    candidate_rows_start: int = 0  # later stages: the previous group's row of candidate 0
    # Chosen at the prune layer, or given (a recompute after preemption keeps the same tokens).
    kept_positions: torch.Tensor | None = None  # [K_s] int64 prompt positions, ascending
    is_replayed: bool = False
    scores: torch.Tensor | None = None  # [C] fp32, summed over the score layers' window attention

    def candidate_positions(self) -> torch.Tensor | None:
        """[C] the candidates' prompt positions; None at the first stage (candidate i is position i)."""
        return None if self.parent is None else self.parent.kept_positions


@dataclass(slots=True)
class KeptRows:
    """One deep group's view of the step: what the layers from its prune layer run (module docstring)."""

    # Over this group's block tables, one sequence per request with rows; None when no request has
    # any (every chunk of the step is a pruned prompt's stage A: the deep layers have nothing to run).
    attention: AttentionMetadata | None
    request_ids: list[str]
    positions: torch.Tensor  # [num_kept_rows] original positions (RoPE); selections' rows set at the prune layer
    logits_indices: torch.Tensor  # [num_sampling] this group's rows
    elastic: ElasticRows | None
    # [num_kept_rows] int64: row r < T (the previous group's rows) is that group's row r; at the
    # first stage r >= T is hidden-cache row r - T, the selections' kept positions in order; at
    # later stages the kept candidates' rows are set at the prune layer.  None: the previous
    # group's rows.
    source_rows: torch.Tensor | None
    selections: list[PromptSelection]

    @property
    def num_tokens(self) -> int:
        return self.positions.shape[0]


@dataclass(slots=True)
class ForwardBatch:
    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64, each token's position in its sequence
    attention: AttentionMetadata
    request_ids: list[str]  # one per sequence, in row order
    # Rows whose final hidden state goes to the LM head (each sampling request's last row).
    logits_indices: torch.Tensor  # [num_sampling] int64
    # cos/sin at `positions`, built once by the model's rotary embedding and read by every layer.
    rope: RopeTables | None = None
    elastic: ElasticRows | None = None  # None: every row runs the full model
    # Each deep group's rows, for a model cut at prune layers (None: one KV group, every layer runs
    # these rows).
    kept: list[KeptRows] | None = None
    # The deep group the batch's fields describe now (0: group 0, the step's own rows).
    group: int = 0

    def enter_kept_rows(self, stage: int) -> None:
        """From here on, layers and the sampler see deep group stage + 1's rows (prune layer
        l_{stage + 1} calls this)."""
        kept = self.kept[stage]
        self.group = stage + 1
        self.attention, self.request_ids, self.elastic = kept.attention, kept.request_ids, kept.elastic
        self.positions, self.logits_indices = kept.positions, kept.logits_indices

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_decodes(self) -> int:
        return self.attention.num_decodes
