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
"""

from __future__ import annotations

from dataclasses import dataclass

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

    def to_level_order(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.order is None else x.index_select(0, self.order)

    def to_batch_order(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.inverse is None else x.index_select(0, self.inverse)

    def level_rows(self, level_index: int) -> tuple[int, int]:
        """The level-order row range [start, end) of the rows at exactly this level index."""
        start = self.rows_upto[level_index - 1] if level_index else 0
        return start, self.rows_upto[level_index]


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

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_decodes(self) -> int:
        return self.attention.num_decodes
