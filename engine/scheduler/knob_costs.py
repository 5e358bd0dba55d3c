"""What the elastic knobs save: a step's time at each elastic level, and a pruned prompt's prefill,
as fractions of the full model's (issue #15).  The SLO policy prices candidate settings with
these on top of the step cost model (cost_model.py), which predicts steps at the full level.

    level        a step costs the full model's prediction x fraction[level], where level is the
                 widest among the step's rows (a bound: what mixing saves is not priced).  Where
                 bf16 slices are prepacked, a step runs every row through its widest level's
                 slices, but from 64 rows the FFN runs each level's rows through its own
                 (engine/model/llama.py, elastic_path, GROUPED_LEVELS_MIN_ROWS); over Q8 blocks
                 each row runs its own level's column tiles, and a step mixing six levels measured
                 1.17-1.37x a step of 16 rows at the widest (benchmarks/README.md, "Elastic levels
                 over Q8 blocks").
                 Decode and prefill steps have their own fractions (a decode step is mostly
                 weights and KV reads, a prefill chunk mostly multiply-adds).  A prefill's
                 attention (its query heads x keys) and the rest scale apart: a level computes
                 attention_fraction of the full model's query heads (the CPU backends compute only
                 a prefill chunk's level's heads; levels 55 and 40 keep one rank of three in most
                 layers) and prefill_fraction of the rest, so a prefill's fraction follows its
                 attention share (StepCostModel.attention_share: about half of a 1,536-token
                 prompt's time on a 2-core CPU, a tenth of a 256-token one's).
    prompt_keep  a pruned prompt runs every token through the layers below the first prune layer
                 and keep^(s/S) of them through stage s's layers (engine/prompt_pruning.py), so its
                 prefill costs keep_fraction(keep) of the whole prompt's, from the prune layers alone.

Fractions are profiled at start-up (engine/profiling.py, profile_level_costs) and refined
online: each observed step at a level moves that level's fraction toward observed / predicted.
Torch-free, like the rest of the scheduler.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

# Each observed step moves its level's fraction this far toward what the step showed: slow enough
# that one slow step (another process on the cores) barely moves it, fast enough to follow drift.
ONLINE_RATE = 0.05
# A step that is nearly all attention says little about the rest of its time: the share observe
# divides by is capped here.
MAX_OBSERVED_ATTENTION_SHARE = 0.8


@dataclass
class KnobCosts:
    levels: tuple[int, ...]  # the model's levels, the full one first (widest first)
    decode_fraction: dict[int, float]  # level -> decode step time / the full level's
    prefill_fraction: dict[int, float]  # level -> a prefill step's time but its attention / the full level's
    # Each deep group's share of a token's layers (engine/prompt_pruning.py, stage_fractions):
    # stage s runs from prune layer s to the next; () when prompt pruning is off.
    prune_stage_shares: tuple[float, ...] = ()
    # level -> the share of the full model's query heads a prefill at that level attends with;
    # a level missing: its attention scales like the rest of its prefill (prefill_fraction).
    attention_fraction: dict[int, float] = field(default_factory=dict)
    _observed: dict[tuple[int, bool], int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for table in (self.decode_fraction, self.prefill_fraction):
            if set(table) != set(self.levels) or any(not 0 < f <= 2 for f in table.values()):
                raise ValueError(f"a fraction in (0, 2] for every level {self.levels}, got {table}")
        if not set(self.attention_fraction) <= set(self.levels) or any(
                not 0 < f <= 1 for f in self.attention_fraction.values()):
            raise ValueError(f"attention fractions in (0, 1] for levels of {self.levels}, got {self.attention_fraction}")

    @classmethod
    def unmeasured(cls, levels: Sequence[int], prune_stage_shares: Sequence[float] = ()) -> KnobCosts:
        """Every level at the full model's cost (what a model that is not elastic has)."""
        ones = {level: 1.0 for level in levels}
        return cls(tuple(levels), dict(ones), dict(ones), tuple(prune_stage_shares))

    def fraction(self, level: int, is_decode: bool, attention_share: float = 0.0) -> float:
        """A step's time at `level` over the full level's; a prefill's depends on the share of its
        full-level time that is attention (`attention_share`, in [0, 1])."""
        if is_decode:
            return self.decode_fraction[level]
        rest = self.prefill_fraction[level]
        return rest + (self.attention_fraction.get(level, rest) - rest) * attention_share

    def keep_fraction(self, keep: float) -> float:
        """A pruned prompt's prefill time over the whole prompt's: layers below the first prune
        layer run every token, stage s's layers keep^(s/S) of them (engine/prompt_pruning.py)."""
        shares = self.prune_stage_shares
        if keep >= 1.0 or not shares:
            return 1.0
        return 1.0 - sum(shares) + sum(share * keep ** ((s + 1) / len(shares)) for s, share in enumerate(shares))

    def observe(self, level: int, is_decode: bool, predicted_full_s: float, elapsed_s: float,
                attention_share: float = 0.0) -> None:
        """A step at `level` took elapsed_s where the full model was predicted at predicted_full_s
        (`attention_share` of it attention): the fraction of what is not attention moves."""
        if level not in self.decode_fraction or not predicted_full_s > 0 or not math.isfinite(elapsed_s):
            return
        table = self.decode_fraction if is_decode else self.prefill_fraction
        seen = min(elapsed_s / predicted_full_s, 2.0)
        if not is_decode and level in self.attention_fraction:
            seen = rest_of_prefill(seen, self.attention_fraction[level], attention_share)
        table[level] += ONLINE_RATE * (seen - table[level])
        self._observed[level, is_decode] = self._observed.get((level, is_decode), 0) + 1

    def as_dict(self) -> dict[str, Mapping]:
        return {"decode_fraction": dict(self.decode_fraction), "prefill_fraction": dict(self.prefill_fraction),
                "prune_stage_shares": list(self.prune_stage_shares), "attention_fraction": dict(self.attention_fraction)}


def rest_of_prefill(fraction: float, attention_fraction: float, attention_share: float) -> float:
    """A prefill at some level took `fraction` of the full model's time, `attention_share` of which
    was attention, run there at `attention_fraction`: what the rest of it took, over the full
    model's rest (KnobCosts.prefill_fraction)."""
    share = min(max(attention_share, 0.0), MAX_OBSERVED_ATTENTION_SHARE)
    return min(max((fraction - attention_fraction * share) / (1.0 - share), 0.05), 2.0)
