"""An elastic checkpoint as the model's layers take it: per layer, each level's widths and its
recovery side paths (engine/model/layers/elastic.py) in the model's dtype and device, and the
weight reordering load_model applies to the file's weights."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from engine.elastic.checkpoint import ElasticCheckpoint
from engine.elastic.permutation import permute_weights
from engine.elastic.spec import ElasticSpec
from engine.elastic.tensor_parallel import check_splits, local_spec, sharded_orders
from engine.elastic.torch_model import BlockCorrection, LayerCorrection
from engine.model.arch import LlamaArchConfig
from engine.model.compute_plan import ComputePlan
from engine.model.layers.elastic import BlockElasticity, LayerElasticity, SidePath
from engine.model.loader import WeightStream
from engine.model.sharding import TensorParallelShard

# level value -> per layer its corrections (None: none), as ElasticCheckpoint.corrections holds them
Corrections = Mapping[int, list[LayerCorrection | None]]


def layer_elasticities(spec: ElasticSpec, corrections: Corrections, dtype: torch.dtype,
                       device: torch.device | str = "cpu") -> list[LayerElasticity]:
    def side_paths(layer: int, block: str) -> tuple[SidePath | None, ...]:
        paths: list[SidePath | None] = [None]  # the full level has none
        for level in spec.levels[1:]:
            per_layer = corrections.get(level.level)
            correction = per_layer[layer] if per_layer is not None else None
            paths.append(_side_path(getattr(correction, block) if correction else None, dtype, device))
        return tuple(paths)

    q_slot = spec.num_kv_heads * spec.head_dim  # columns of one head rank across the KV groups
    return [LayerElasticity(
        ffn=BlockElasticity(widths=tuple(level.ffn_widths[layer] for level in spec.levels),
                            side_paths=side_paths(layer, "ffn")),
        attention=BlockElasticity(widths=tuple(level.head_ranks[layer] * q_slot for level in spec.levels),
                                  side_paths=side_paths(layer, "attn")))
        for layer in range(spec.num_layers)]


def _side_path(correction: BlockCorrection | None, dtype: torch.dtype, device: torch.device | str) -> SidePath | None:
    terms = [None, None, None] if correction is None else [correction.bias, correction.lora_a, correction.lora_b]
    if all(t is None for t in terms):
        return None
    if (terms[1] is None) != (terms[2] is None):
        raise ValueError("an elastic checkpoint's lora_a and lora_b come together")
    bias, lora_a, lora_b = terms
    # The low-rank path stays fp32 (SidePath.add_to); the bias is added in the model's dtype.
    return SidePath(_on(bias, device, dtype), _on(lora_a, device, torch.float32), _on(lora_b, device, torch.float32))


def _on(tensor: torch.Tensor | None, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor | None:
    return None if tensor is None else tensor.detach().to(device=device, dtype=dtype).contiguous()


def elastic_model_parts(checkpoint: ElasticCheckpoint, arch: LlamaArchConfig, plan: ComputePlan,
                        shard: TensorParallelShard | None = None,
                        ) -> tuple[list[LayerElasticity], Callable[[WeightStream], WeightStream]]:
    """What load_model takes to build the elastic model: its layers' levels, and the function
    that turns the file's weight stream into the importance-ordered one.  `shard`: this rank of a
    tensor-parallel group, which runs its share of every level (engine/elastic/tensor_parallel.py)."""
    spec, ffn_orders, head_orders, corrections = (checkpoint.spec, checkpoint.ffn_orders, checkpoint.head_orders,
                                                  checkpoint.corrections)
    if shard is not None:
        check_splits(spec, shard.size)
        ffn_orders, head_orders = sharded_orders(ffn_orders, head_orders, arch, shard.size)
        # Side paths add to the block's output once: rank 0's partial sum carries them.
        spec, corrections = local_spec(spec, shard), corrections if shard.rank == 0 else {}
    layers = layer_elasticities(spec, corrections, plan.dtype, plan.device)

    def reorder(weights: WeightStream) -> WeightStream:
        return permute_weights(weights, arch, ffn_orders, head_orders)

    return layers, reorder
