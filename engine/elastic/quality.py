"""Quality of a submodel against the full model, on token batches: answer perplexity and
teacher-forced top-1 agreement (the full model's argmax at each scored position equals the
submodel's).  The full model's argmax is computed once (`reference_top1`) and reused per level."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.elastic.calibration import TokenBatch
from engine.elastic.torch_model import LayerCorrection, LayerSelection, TorchLlama


@dataclass(frozen=True)
class Quality:
    perplexity: float
    top1_agreement: float  # fraction of scored positions
    num_scored: int


def reference_top1(model: TorchLlama, batches: Sequence[TokenBatch]) -> list[torch.Tensor]:
    """The full model's argmax at each scored position of each batch (flattened, [num_scored])."""
    with torch.no_grad():
        return [scored_logits(model, batch).argmax(-1) for batch in batches]


def measure(model: TorchLlama, batches: Sequence[TokenBatch], reference: Sequence[torch.Tensor],
            submodel: Sequence[LayerSelection] | None = None,
            corrections: Sequence[LayerCorrection | None] | None = None) -> Quality:
    total_nll, agree, count = 0.0, 0, 0
    if submodel is not None:  # every batch runs it: its weights cut once, not per forward
        submodel = model.cut_submodel(submodel, torch.float32)
    with torch.no_grad():
        for batch, top1 in zip(batches, reference):
            logits = scored_logits(model, batch, submodel, corrections)
            targets = batch.input_ids[:, 1:][batch.scored]
            total_nll -= float(torch.log_softmax(logits, -1).gather(-1, targets[:, None]).double().sum())
            agree += int((logits.argmax(-1) == top1).sum())
            count += batch.num_scored
    return Quality(math.exp(total_nll / count), agree / count, count)


def scored_logits(model: TorchLlama, batch: TokenBatch, submodel: Sequence[LayerSelection] | None = None,
                  corrections: Sequence[LayerCorrection | None] | None = None) -> torch.Tensor:
    """[num_scored, vocab]: the LM head only on the rows that predict a scored token (PERF: the
    head and its softmax are a fifth of the model's multiply-adds and most of its memory)."""
    hidden = model.hidden_states(batch.input_ids, submodel, corrections)
    return model.logits(hidden[:, :-1][batch.scored])
