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
                 weights and KV reads, a prefill chunk mostly multiply-adds).
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


@dataclass
class KnobCosts:
    levels: tuple[int, ...]  # the model's levels, the full one first (widest first)
    decode_fraction: dict[int, float]  # level -> decode step time / the full level's
    prefill_fraction: dict[int, float]  # level -> prefill step time / the full level's
    # Each deep group's share of a token's layers (engine/prompt_pruning.py, stage_fractions):
    # stage s runs from prune layer s to the next; () when prompt pruning is off.
    prune_stage_shares: tuple[float, ...] = ()
    _observed: dict[tuple[int, bool], int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for table in (self.decode_fraction, self.prefill_fraction):
            if set(table) != set(self.levels) or any(not 0 < f <= 2 for f in table.values()):
                raise ValueError(f"a fraction in (0, 2] for every level {self.levels}, got {table}")

    @classmethod
    def unmeasured(cls, levels: Sequence[int], prune_stage_shares: Sequence[float] = ()) -> KnobCosts:
        """Every level at the full model's cost (what a model that is not elastic has)."""
        ones = {level: 1.0 for level in levels}
        return cls(tuple(levels), dict(ones), dict(ones), tuple(prune_stage_shares))

    def fraction(self, level: int, is_decode: bool) -> float:
        return (self.decode_fraction if is_decode else self.prefill_fraction)[level]

    def keep_fraction(self, keep: float) -> float:
        """A pruned prompt's prefill time over the whole prompt's: layers below the first prune
        layer run every token, stage s's layers keep^(s/S) of them (engine/prompt_pruning.py)."""
        shares = self.prune_stage_shares
        if keep >= 1.0 or not shares:
            return 1.0
        return 1.0 - sum(shares) + sum(share * keep ** ((s + 1) / len(shares)) for s, share in enumerate(shares))

    def observe(self, level: int, is_decode: bool, predicted_full_s: float, elapsed_s: float) -> None:
        """A step at `level` took elapsed_s where the full model was predicted at predicted_full_s."""
        if level not in self.decode_fraction or not predicted_full_s > 0 or not math.isfinite(elapsed_s):
            return
        table = self.decode_fraction if is_decode else self.prefill_fraction
        seen = min(elapsed_s / predicted_full_s, 2.0)
        table[level] += ONLINE_RATE * (seen - table[level])
        self._observed[level, is_decode] = self._observed.get((level, is_decode), 0) + 1

    def as_dict(self) -> dict[str, Mapping]:
        return {"decode_fraction": dict(self.decode_fraction), "prefill_fraction": dict(self.prefill_fraction),
                "prune_stage_shares": list(self.prune_stage_shares)}
