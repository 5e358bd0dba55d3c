"""An elastic checkpoint's description: which prefix of each weight every level keeps.

Elastification (engine/elastic/elastify.py) reorders each layer's FFN neurons and query heads by
importance once, so that every smaller submodel keeps a prefix of the reordered order:

    FFN, layer l, level k:  neurons [0, ffn_widths[l])  of gate/up rows and down columns
    attention, layer l:     query-head slots [0, head_ranks[l] * num_kv_heads) of the q rows and
                            o_proj column groups, in rank-major slot order:

        slot:   | r0 g0 | r0 g1 | .. | r0 g{G-1} | r1 g0 | r1 g1 | .. |
                '--- each KV group's best head ---'-- its second best --'

    so keeping `r` ranks keeps the `r` best query heads of every KV group.  K and V heads are
    never pruned: every level writes the same KV layout, so a request may change level between
    steps (its earlier KV was written at its earlier level).

Invariants (checked in __post_init__): levels are strictly descending, the first is the full
model (FULL_LEVEL, every width whole); widths never grow as the level falls; FFN widths are
multiples of `width_multiple` (the quantization block, so prefixes of quantized blocks stay
whole blocks) or the whole width; anchor layers keep every width at every level.

This module does no I/O and imports no torch; engine/elastic/checkpoint.py reads and writes it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

FULL_LEVEL = 100


@dataclass(frozen=True)
class ElasticLevel:
    level: int  # nominal size in percent of the prunable widths; FULL_LEVEL is the whole model
    ffn_widths: tuple[int, ...]  # per layer: FFN neurons kept (a prefix of the reordered neurons)
    head_ranks: tuple[int, ...]  # per layer: query heads kept in every KV group (1 .. group size)


@dataclass(frozen=True)
class ElasticSpec:
    """How one model file was made elastic.  Levels are indexed 0 (full) .. len-1 (smallest)."""

    source_digest: str  # of the model file it was made from; a checkpoint for another file is refused
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    anchor_layers: tuple[int, ...]  # kept whole at every level
    levels: tuple[ElasticLevel, ...]
    width_multiple: int = 32

    def __post_init__(self) -> None:
        _check_levels(self)

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def level_values(self) -> tuple[int, ...]:
        return tuple(level.level for level in self.levels)

    def level_index(self, level: int) -> int:
        """Index of a level value; ValueError naming the levels this checkpoint has."""
        for index, candidate in enumerate(self.levels):
            if candidate.level == level:
                return index
        raise ValueError(f"unknown elastic level {level}; this model has levels {list(self.level_values)}")

    def flop_fraction(self, level: int, context_len: int = 0) -> float:
        """Multiply-adds of one token at `level` over the full model's: every linear layer and the
        LM head, plus attention's score and value products at `context_len` keys.  The nominal
        level is a width; this is what it costs (anchors and the LM head stay whole)."""
        return _token_macs(self, self.levels[self.level_index(level)], context_len) / _token_macs(
            self, self.levels[0], context_len)

    def head_fraction(self, level: int) -> float:
        """The share of the full model's query heads `level` keeps, over every layer (anchors
        keep all): what a prefill at that level computes of the full model's attention."""
        ranks = self.levels[self.level_index(level)].head_ranks
        return sum(ranks) / (self.num_layers * self.group_size)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> ElasticSpec:
        raw = json.loads(text)
        raw["anchor_layers"] = tuple(raw["anchor_layers"])
        raw["levels"] = tuple(ElasticLevel(level=int(item["level"]), ffn_widths=tuple(item["ffn_widths"]),
                                           head_ranks=tuple(item["head_ranks"])) for item in raw["levels"])
        return cls(**raw)


def _token_macs(spec: ElasticSpec, level: ElasticLevel, context_len: int) -> int:
    hidden, head_dim, kv_dim = spec.hidden_size, spec.head_dim, spec.num_kv_heads * spec.head_dim
    macs = spec.vocab_size * hidden  # LM head
    for width, ranks in zip(level.ffn_widths, level.head_ranks):
        q_dim = ranks * spec.num_kv_heads * head_dim
        macs += hidden * (q_dim + 2 * kv_dim) + q_dim * hidden  # wqkv, wo
        macs += 3 * hidden * width  # gate, up, down
        macs += 2 * q_dim * context_len  # scores and values
    return macs


def _check_levels(spec: ElasticSpec) -> None:
    if not spec.levels or spec.levels[0].level != FULL_LEVEL:
        raise ValueError(f"the first elastic level must be the full model ({FULL_LEVEL})")
    values = spec.level_values
    if any(a <= b for a, b in zip(values, values[1:])) or values[-1] <= 0:
        raise ValueError(f"elastic levels must be positive and strictly descending, got {list(values)}")
    full, group = spec.levels[0], spec.group_size
    if set(full.ffn_widths) != {spec.intermediate_size} or set(full.head_ranks) != {group}:
        raise ValueError("the full level must keep every neuron and head")
    for level in spec.levels:
        if len(level.ffn_widths) != spec.num_layers or len(level.head_ranks) != spec.num_layers:
            raise ValueError(f"level {level.level}: one width per layer expected")
        for layer, (width, ranks) in enumerate(zip(level.ffn_widths, level.head_ranks)):
            whole = width == spec.intermediate_size and ranks == group
            if layer in spec.anchor_layers and not whole:
                raise ValueError(f"level {level.level}: anchor layer {layer} must stay whole")
            if not (0 < width <= spec.intermediate_size and 1 <= ranks <= group):
                raise ValueError(f"level {level.level}, layer {layer}: width {width}, ranks {ranks} out of range")
            if width % spec.width_multiple and width != spec.intermediate_size:
                raise ValueError(f"level {level.level}, layer {layer}: FFN width {width} is not a multiple of "
                                 f"{spec.width_multiple}")
    for wider, narrower in zip(spec.levels, spec.levels[1:]):
        if any(n > w for n, w in zip(narrower.ffn_widths, wider.ffn_widths)) or any(
                n > w for n, w in zip(narrower.head_ranks, wider.head_ranks)):
            raise ValueError(f"level {narrower.level} keeps more than level {wider.level} somewhere")
