"""Per-layer widths of every level: which FFN neurons and query-head ranks each level keeps.

Level L (< 100) keeps L% of the prunable multiply-adds of the non-anchor layers (FFN neurons and
query heads with their o_proj columns; K/V heads, norms, anchors and the LM head are never
pruned, which is why a level's FLOP fraction, ElasticSpec.flop_fraction, is above L%).

Units of pruning, each with a cost in multiply-adds per token and an importance score:

    FFN chunk   `width_multiple` (32) consecutive neurons of a layer's importance order
                cost 3 * H * 32 (gate, up rows; down columns); score = sum of their Taylor scores
    head rank   rank r of a layer: the r-th best query head of every KV group
                cost 2 * H * D * num_kv_heads (q rows, o columns); score = sum of those heads'

Allocation walks one global order of units, cheapest importance per multiply-add first, and
drops units until each level's budget is met; each level continues from the one above it, so
widths never grow as the level falls (ElasticSpec's invariant), and within a layer the least
important chunk or rank always goes first (scores are sorted within a layer).  Head ranks join
the walk only at the lower levels (`head_pruning_max_level`, measured).  Per-layer floors
(`min_ffn_fraction`, one head rank) keep every layer alive.

`per_layer=False` is the measured alternative, uniform allocation: every non-anchor layer keeps
the same L% of its own prunable multiply-adds (importance still picks what goes inside a layer).
Which one elastify uses, and with which normalisation, is decided by measurement in elastify.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.elastic.importance import Importance
from engine.elastic.spec import FULL_LEVEL, ElasticLevel
from engine.model.arch import LlamaArchConfig


@dataclass(frozen=True)
class AllocationConfig:
    per_layer: bool = True  # global walk over all layers (importance allocates widths); False: uniform
    normalise: bool = True  # divide each layer's scores by its mean (Taylor scale differs by depth)
    prune_heads: bool = True  # head ranks are units too; False keeps every query head
    # Head ranks join the walk only at levels at or below this.  Measured (SmolLM2-135M, 8 dev
    # conversations, training-free): at level 80 pruning heads with the FFN by Taylor score
    # gave perplexity 51.7 (most layers kept 1 rank of 3), FFN only 7.97; at level 40 it is the
    # other way round, 194 with heads against 458 without (FFN alone must fall to 25%).
    # Scaling head scores up (x10, x30) sat in between at 40 (332, 458) and equal at 80.
    head_pruning_max_level: int = 55
    head_score_scale: float = 1.0  # > 1 makes heads look more important than their score says
    min_ffn_fraction: float = 0.1  # per-layer floor of FFN neurons, rounded up to width_multiple
    width_multiple: int = 32


@dataclass(frozen=True)
class _Unit:
    priority: float  # importance per multiply-add (lower goes first)
    layer: int
    is_head: bool
    position: int  # chunk index or rank
    cost: int


def _walk_key(unit: _Unit) -> tuple[float, int]:
    # Within a layer priorities never rise with position (scores are sorted); on a tie the later
    # position must go first, or it would block the earlier one (only a layer's last unit goes).
    return unit.priority, -unit.position


def allocate_levels(config: LlamaArchConfig, importance: Importance, ffn_orders: torch.Tensor,
                    head_orders: torch.Tensor, anchors: tuple[int, ...], level_values: tuple[int, ...],
                    allocation: AllocationConfig, budgets: tuple[float, ...] | None = None
                    ) -> tuple[ElasticLevel, ...]:
    """The spec's levels (the first FULL_LEVEL) for `level_values` (descending, from 100).
    `budgets`: per level the fraction of prunable multiply-adds kept (default value / 100;
    quality baselines set it to compare at equal cost)."""
    ffn_width, group = config.intermediate_size, config.num_heads // config.num_kv_heads
    whole = ElasticLevel(FULL_LEVEL, (ffn_width,) * config.num_layers, (group,) * config.num_layers)
    units = _units(config, importance, ffn_orders, head_orders, anchors, allocation)
    prunable = _prunable_macs(config, anchors)
    levels = [whole]
    budgets = budgets or tuple(value / FULL_LEVEL for value in level_values)
    for value, budget in zip(level_values[1:], budgets[1:]):
        levels.append(_level(config, value, budget, units, prunable, allocation, levels[-1]))
    return tuple(levels)


def _level(config: LlamaArchConfig, value: int, budget: float, units: list[list[_Unit]], prunable: list[int],
           allocation: AllocationConfig, wider: ElasticLevel) -> ElasticLevel:
    """Drop units in walk order until the kept prunable multiply-adds are at most `budget`.  Uniform
    allocation walks each layer on its own budget; per-layer allocation one global walk."""
    widths, ranks = list(wider.ffn_widths), list(wider.head_ranks)
    if not allocation.prune_heads or value > allocation.head_pruning_max_level:
        units = [[u for u in layer if not u.is_head] for layer in units]
    walks = [sorted((u for layer in units for u in layer), key=_walk_key)] if allocation.per_layer else [
        sorted(layer, key=_walk_key) for layer in units]
    budgets = [sum(prunable)] if allocation.per_layer else prunable
    for walk, total in zip(walks, budgets):
        removed = _removed(config, walk, widths, ranks)
        for unit in walk:
            if total - removed <= budget * total:
                break
            if _is_kept(unit, widths, ranks, allocation):
                continue
            if unit.is_head:
                ranks[unit.layer] -= 1
            else:
                widths[unit.layer] -= allocation.width_multiple
            removed += unit.cost
    return ElasticLevel(value, tuple(widths), tuple(ranks))


def _removed(config: LlamaArchConfig, walk: list[_Unit], widths: list[int], ranks: list[int]) -> int:
    """Multiply-adds the wider level already dropped from this walk's layers."""
    layers = {unit.layer for unit in walk}
    group = config.num_heads // config.num_kv_heads
    hidden = config.hidden_size
    return sum(3 * hidden * (config.intermediate_size - widths[layer])
               + 2 * hidden * config.head_dim * config.num_kv_heads * (group - ranks[layer]) for layer in layers)


def _is_kept(unit: _Unit, widths: list[int], ranks: list[int], allocation: AllocationConfig) -> bool:
    """True when the unit is already gone or must stay (the layer's floor, or not its last unit)."""
    if unit.is_head:
        return unit.position != ranks[unit.layer] - 1 or ranks[unit.layer] == 1
    return unit.position != widths[unit.layer] // allocation.width_multiple - 1


def _units(config: LlamaArchConfig, importance: Importance, ffn_orders: torch.Tensor, head_orders: torch.Tensor,
           anchors: tuple[int, ...], allocation: AllocationConfig) -> list[list[_Unit]]:
    """Each non-anchor layer's prunable units above its floors, with their priorities."""
    hidden, multiple = config.hidden_size, allocation.width_multiple
    min_chunks = -(-int(allocation.min_ffn_fraction * config.intermediate_size) // multiple)
    chunk_cost, rank_cost = 3 * hidden * multiple, 2 * hidden * config.head_dim * config.num_kv_heads
    units: list[list[_Unit]] = []
    for layer in range(config.num_layers):
        if layer in anchors:
            units.append([])
            continue
        ffn = importance.ffn[layer][ffn_orders[layer]]
        heads = importance.heads[layer][head_orders[layer]].reshape(-1, config.num_kv_heads).sum(1)
        scale = float(ffn.mean()) if allocation.normalise else 1.0
        chunks = ffn.reshape(-1, multiple).sum(1) / scale
        layer_units = [_Unit(float(chunks[i]) / chunk_cost, layer, False, i, chunk_cost)
                       for i in range(min_chunks, len(chunks))]
        if allocation.prune_heads:  # (used at levels <= head_pruning_max_level only)
            # Heads normalise by the FFN scale too: both are losses of one layer's output.
            layer_units += [_Unit(float(heads[r]) / scale * allocation.head_score_scale / rank_cost, layer, True,
                                  r, rank_cost) for r in range(1, len(heads))]
        units.append(layer_units)
    return units


def _prunable_macs(config: LlamaArchConfig, anchors: tuple[int, ...]) -> list[int]:
    """Per layer, the multiply-adds of its FFN and query heads (0 for anchors).  Heads count even
    when `prune_heads` is off, so a level costs the same whichever units allocation may drop."""
    hidden = config.hidden_size
    per_layer = 3 * hidden * config.intermediate_size + 2 * hidden * config.head_dim * config.num_heads
    return [0 if layer in anchors else per_layer for layer in range(config.num_layers)]
