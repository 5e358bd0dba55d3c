"""ForwardBatch: one step's batch as every layer of the model sees it.

The runner builds it from a SchedulerOutput; the model hands it, unchanged, to every layer, and
each layer reads what it needs: attention its metadata, RoPE the positions, a linear layer (later)
the rows' per-request settings.  Row layout (what `AttentionMetadata` draws in full):

    rows:      | d0 | d1 | ... | d{D-1} | p0 chunk ...... | p1 chunk ... |
               '-- one row per decode --'-- prefill chunks, in scheduled order --'

Per-row settings (an elastic level, a pruning decision) get typed fields here, one value per
request (`request_ids` order), never a string-keyed dict; a layer that keeps fewer rows says so
here and every later layer and the sampler follow it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.model.attention_backends.metadata import AttentionMetadata
from engine.model.layers.rotary import RopeTables


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

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_decodes(self) -> int:
        return self.attention.num_decodes
