"""An elastic checkpoint as the model's layers take it: per layer, each level's widths and its
recovery side paths (engine/model/layers/elastic.py), in the model's dtype and device.

Tensor names (engine/elastic/checkpoint.py writes them): for level value L < 100 and layer l,
`levels.{L}.layers.{l}.{ffn|attn}.{bias|lora_a|lora_b}`; a missing tensor is no term.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from engine.elastic.spec import FULL_LEVEL, ElasticSpec
from engine.model.arch import LlamaArchConfig
from engine.model.compute_plan import ComputePlan
from engine.model.layers.elastic import BlockElasticity, LayerElasticity, SidePath
from engine.model.loader import WeightStream


def layer_elasticities(spec: ElasticSpec, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype,
                       device: torch.device | str = "cpu") -> list[LayerElasticity]:
    def side_path(level: int, layer: int, block: str) -> SidePath | None:
        if level == FULL_LEVEL:
            return None
        prefix = f"levels.{level}.layers.{layer}.{block}."
        parts = {part: tensors.get(prefix + part) for part in ("bias", "lora_a", "lora_b")}
        if all(t is None for t in parts.values()):
            return None
        if (parts["lora_a"] is None) != (parts["lora_b"] is None):
            raise ValueError(f"{prefix}lora_a and lora_b come together")
        return SidePath(**{part: None if t is None else t.to(device=device, dtype=dtype) for part, t in parts.items()})

    q_slot = spec.num_kv_heads * spec.head_dim  # columns of one head rank across the KV groups
    layers = []
    for layer in range(spec.num_layers):
        levels = [level.level for level in spec.levels]
        ffn = BlockElasticity(widths=tuple(level.ffn_widths[layer] for level in spec.levels),
                              side_paths=tuple(side_path(value, layer, "ffn") for value in levels))
        attention = BlockElasticity(widths=tuple(level.head_ranks[layer] * q_slot for level in spec.levels),
                                    side_paths=tuple(side_path(value, layer, "attn") for value in levels))
        layers.append(LayerElasticity(ffn=ffn, attention=attention))
    return layers


def elastic_model_parts(checkpoint: Any, arch: LlamaArchConfig, plan: ComputePlan
                        ) -> tuple[list[LayerElasticity], Callable[[WeightStream], WeightStream]]:
    """What load_model takes to build the elastic model: its layers' levels, and the function
    that turns the file's weight stream into the importance-ordered one."""
    from engine.elastic.permutation import reorder_weights  # TODO(merge): elastify branch

    layers = layer_elasticities(checkpoint.spec, checkpoint.tensors, plan.dtype, plan.device)

    def reorder(weights: WeightStream) -> WeightStream:
        return reorder_weights(weights, checkpoint, arch, keep_quantized=plan.quantized)

    return layers, reorder
