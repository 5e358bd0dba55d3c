"""Reorder a model's weights once so that every elastic level is a prefix of each matrix.

Takes the (hf_name, weight) stream the loaders give (engine.model.gguf_loader, hf_loader) and
yields the same stream reordered, dense tensors and QuantizedWeight blocks alike:

    q_proj  rows    by head, into rank-major slots: slot s holds head head_order[s] (its D rows)
    o_proj  columns by head, the same slots (D-column groups)
    gate, up rows    by neuron: position i holds neuron ffn_order[i]
    down    columns by neuron

K and V are untouched: every level keeps every KV head.  A permuted model reads KV head
s % num_kv_heads from slot s (TorchLlama(rank_major_heads=True); the runtime's rule).

Quantized blocks: a row permutation moves whole rows of blocks, exactly (byte for byte).  o_proj's
column groups are whole heads, D = 64 columns = 2 blocks of 32, so moving them moves whole blocks,
also exactly.  down_proj's columns are single neurons inside 32-wide blocks: no block survives a neuron
permutation, and no block format holds the moved values exactly (each block of the file has its
own scale and minimum), so a quantized down_proj keeps its file blocks in stored order with the
permutation beside them (InputPermutedBlocks): the layer gathers its input into stored order.
Every weight format of an elastic model is then the same model, value for value: native computes
what dequantized does, as without elastification.  (Re-quantizing to Q8_0 instead changed greedy
continuations against the dequantized model; keeping down_proj as bf16 cost 53 MB against 17 MB
of Q4_1, read every decode step: single-stream decode 15.2 against 10.7 ms a token.)  A plan that
rounds activations to Q8 has left exactness already, and there the layer re-blocks it as Q8_0 in
this order after all (engine/model/layers/linear.py, in_plan_format), so that a level's neurons
are a prefix of whole blocks.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from engine.kernels.cpu.quantized_weights import BLOCK_SIZE, InputPermutedBlocks, QuantizedWeight
from engine.model.arch import LlamaArchConfig

Weight = torch.Tensor | QuantizedWeight | InputPermutedBlocks


def permute_weights(weights: Iterable[tuple[str, Weight]], config: LlamaArchConfig, ffn_orders: torch.Tensor,
                    head_orders: torch.Tensor) -> Iterator[tuple[str, Weight]]:
    """The stream with each layer's FFN neurons in `ffn_orders[l]` order and query heads in
    `head_orders[l]` slot order (int64 [num_layers, intermediate] and [num_layers, num_heads])."""
    for name, weight in weights:
        parts = name.split(".")
        if len(parts) < 5 or parts[:2] != ["model", "layers"]:
            yield name, weight
            continue
        layer, kind = int(parts[2]), ".".join(parts[3:])
        yield name, _permuted(kind, weight, ffn_orders[layer], head_orders[layer], config.head_dim)


def _permuted(kind: str, weight: Weight, ffn_order: torch.Tensor, head_order: torch.Tensor,
              head_dim: int) -> Weight:
    head_rows = (head_order[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)
    if kind in ("self_attn.q_proj.weight", "self_attn.q_proj.bias"):
        return permute_rows(weight, head_rows)
    if kind == "self_attn.o_proj.weight":
        return permute_column_groups(weight, head_order, head_dim)
    if kind in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
        return permute_rows(weight, ffn_order)
    if kind == "mlp.down_proj.weight":
        return permute_column_groups(weight, ffn_order, 1)
    return weight


def permute_rows(weight: Weight, rows: torch.Tensor) -> Weight:
    """Row i of the result is row rows[i]: exact for blocks (a row is its own blocks)."""
    if isinstance(weight, QuantizedWeight):
        return QuantizedWeight(weight.blocks[rows].contiguous(), weight.format)
    return weight[rows].contiguous()


def permute_column_groups(weight: Weight, groups: torch.Tensor, group_size: int) -> Weight:
    """Column group i (of `group_size` columns) of the result is group groups[i].  Blocks move
    whole when a group is whole blocks; otherwise they stay in place, the permutation beside them
    (module docstring)."""
    columns = (groups[:, None] * group_size + torch.arange(group_size)).reshape(-1)
    if not isinstance(weight, QuantizedWeight):
        return weight[:, columns].contiguous()
    if group_size % BLOCK_SIZE == 0:
        blocks_per_group, block_bytes = group_size // BLOCK_SIZE, weight.format.block_bytes
        block_ids = (groups[:, None] * blocks_per_group + torch.arange(blocks_per_group)).reshape(-1)
        blocks = weight.blocks.reshape(weight.out_features, -1, block_bytes)[:, block_ids]
        return QuantizedWeight(blocks.reshape(weight.out_features, -1).contiguous(), weight.format)
    return InputPermutedBlocks(weight, columns)
