"""Anchor layers: the layers whose pruning hurts most, kept whole at every level.

A layer's sensitivity is measured directly: that layer alone is pruned to the floor widths (its
least important FFN neurons and query-head ranks dropped, by the importance orders), every other
layer whole, and the calibration loss rises by some amount; the ~20% of layers with the largest
rise become anchors (issue #13).  The full model's input to every layer is computed once, so
ablating layer l costs only layers l .. L-1 and the LM head (about half a forward on average).
"""

from __future__ import annotations

import math

import torch
from tqdm import tqdm

from engine.elastic.calibration import TokenBatch
from engine.elastic.torch_model import LayerSelection, TorchLlama, token_nll

ANCHOR_FRACTION = 0.2


def ablation_losses(model: TorchLlama, batch: TokenBatch, ablated: list[LayerSelection],
                    progress: bool = True) -> torch.Tensor:
    """[num_layers] calibration loss (mean NLL of the scored tokens) with layer l alone pruned to
    `ablated[l]`, minus the full model's."""
    with torch.no_grad():
        rope = model.rope(batch.input_ids.shape[1])
        inputs = [model.embed(batch.input_ids)]
        for index in range(model.config.num_layers):
            inputs.append(model.layer(index, inputs[-1], rope))
        full = _loss(model, inputs[-1], batch)
        rises = []
        for index in tqdm(range(model.config.num_layers), desc="anchor ablations", disable=not progress):
            h = model.layer(index, inputs[index], rope, ablated[index])
            for later in range(index + 1, model.config.num_layers):
                h = model.layer(later, h, rope)
            rises.append(_loss(model, h, batch) - full)
    return torch.tensor(rises, dtype=torch.float64)


def choose_anchors(loss_rises: torch.Tensor, fraction: float = ANCHOR_FRACTION) -> tuple[int, ...]:
    """The ceil(fraction * num_layers) layers whose ablation raised the loss most, ascending."""
    count = math.ceil(fraction * len(loss_rises))
    return tuple(sorted(int(i) for i in torch.argsort(loss_rises, descending=True)[:count]))


def _loss(model: TorchLlama, h: torch.Tensor, batch: TokenBatch) -> float:
    nll = token_nll(model.logits(model.final_norm(h)), batch.input_ids, batch.scored)
    return float(nll.sum() / batch.num_scored)
