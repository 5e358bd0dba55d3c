"""What the elastic knobs save: a step's time at each elastic level, and a pruned prompt's prefill,
as fractions of the full model's (issue #15).  The SLO policy prices candidate settings with
these on top of the step cost model (cost_model.py), which predicts steps at the full level.

    level        a step at one level costs the full model's prediction x fraction[level].
                 Decode and prefill steps have their own fractions (a decode step is mostly
                 weights and KV reads, a prefill chunk mostly multiply-adds).  A step whose prefill
                 chunks run at another level than its decodes (StepLevels) is priced in two
                 parts, since each level's rows run through that level's weights: its decodes at
                 their widest level's decode fraction, the rest of its time (the chunks' share
                 of the full model's prediction) at the chunks' widest level's prefill fraction
                 (priced_s).  Where bf16 slices are prepacked, a step of 64 rows or more runs
                 each level's rows through its own slices (engine/model/llama.py,
                 runs_level_groups); over Q8 blocks each row runs its own level's column tiles
                 at any row count.  Before, a mixed step was priced whole at its widest row's
                 level and a level's fractions learned from such steps: at 1.5x load in #15's
                 benchmark, documents' small chunks beside chats at level 70 pushed level 70's
                 prefill fraction to 1.3-1.4, and every chunk beside those chats, however large,
                 was then priced at 1.4x the full model (benchmarks/README.md, "Mixed levels in
                 large steps").  Left: on AMX CPUs a mixed step of 33-63 rows runs every row at
                 its widest level and is priced as above.  A prefill's
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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# Each observed step moves its level's fraction this far toward what the step showed: slow enough
# that one slow step (another process on the cores) barely moves it, fast enough to follow drift.
ONLINE_RATE = 0.05
# A step that is nearly all attention says little about the rest of its time: the share observe
# divides by is capped here.
MAX_OBSERVED_ATTENTION_SHARE = 0.8


# A mixed step whose chunks' part is below this share of its full-model prediction says too
# little about the chunks' level to learn from (its decodes' part is a prediction, not a measure).
MIN_OBSERVED_CHUNK_SHARE = 0.5


@dataclass(frozen=True, slots=True)
class StepLevels:
    """The levels a step's rows run at, as pricing needs them: the widest level among its decodes
    and among its prefill chunks, None where it has none."""

    decode: int | None
    chunk: int | None

    @classmethod
    def of(cls, scheduled: Iterable[Any]) -> StepLevels:
        """Of ScheduledRequest-likes (elastic_level, num_scheduled_tokens): a decode runs one token."""
        decode = chunk = None
        for s in scheduled:
            if s.num_scheduled_tokens == 1:
                decode = s.elastic_level if decode is None else max(decode, s.elastic_level)
            else:
                chunk = s.elastic_level if chunk is None else max(chunk, s.elastic_level)
        return cls(decode, chunk)

    @property
    def widest(self) -> int | None:
        return max((level for level in (self.decode, self.chunk) if level is not None), default=None)

    @property
    def is_mixed(self) -> bool:
        """Decodes and chunks at different levels: priced in two parts (KnobCosts.priced_s)."""
        return self.decode is not None and self.chunk is not None and self.decode != self.chunk


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

    def prefill_fraction_bound(self, level: int, attention_share: float | None) -> float:
        """fraction(level, prefill) at this attention share; None (not known yet, as when a chunk
        is being sized): the larger of the two ends, a bound."""
        if attention_share is None:
            return max(self.fraction(level, False, 0.0), self.fraction(level, False, 1.0))
        return self.fraction(level, False, attention_share)

    def priced_s(self, full_s: float, decodes_full_s: float, levels: StepLevels,
                 attention_share: float | None = None) -> float:
        """A step's time from the full model's prediction of it (full_s) and of its decodes alone
        (decodes_full_s).  `attention_share`: of full_s, the part that is prefill attention."""
        if levels.chunk is None:
            return full_s * (1.0 if levels.decode is None else self.decode_fraction[levels.decode])
        if not levels.is_mixed:
            return full_s * self.prefill_fraction_bound(levels.chunk, attention_share)
        chunks_s = max(full_s - decodes_full_s, 0.0)
        return (decodes_full_s * self.decode_fraction[levels.decode]
                + chunks_s * self.prefill_fraction_bound(levels.chunk, _share_of(attention_share, full_s, chunks_s)))

    def full_budget_s(self, limit_s: float, decodes_full_s: float, levels: StepLevels) -> float:
        """The inverse of priced_s (attention share unknown): the most the full model may predict
        a step at for it to be priced within limit_s (decodes_full_s: its decodes' part)."""
        if levels.chunk is None:
            return limit_s / (1.0 if levels.decode is None else self.decode_fraction[levels.decode])
        chunks = self.prefill_fraction_bound(levels.chunk, None)
        if not levels.is_mixed:
            return limit_s / chunks
        return decodes_full_s + (limit_s - decodes_full_s * self.decode_fraction[levels.decode]) / chunks

    def observe_step(self, levels: StepLevels, full_s: float, decodes_full_s: float, elapsed_s: float,
                     attention_share: float = 0.0) -> None:
        """A step at these levels took elapsed_s where the full model was predicted at full_s (its
        decodes at decodes_full_s): the fraction of the level that set its price moves.  A mixed
        step teaches its chunks' level what is left once its decodes' part is taken out; one
        whose chunks are a small part of it, or that holds full-level chunks, teaches nothing."""
        if not levels.is_mixed:
            level = levels.chunk if levels.chunk is not None else levels.decode
            if level is not None:
                self.observe(level, levels.chunk is None, full_s, elapsed_s, attention_share)
            return
        chunks_s = full_s - decodes_full_s
        chunks_elapsed_s = elapsed_s - decodes_full_s * self.decode_fraction[levels.decode]
        if levels.chunk == self.levels[0] or chunks_s < MIN_OBSERVED_CHUNK_SHARE * full_s or chunks_elapsed_s <= 0:
            return
        self.observe(levels.chunk, False, chunks_s, chunks_elapsed_s, _share_of(attention_share, full_s, chunks_s))

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


def _share_of(attention_share: float | None, full_s: float, part_s: float) -> float | None:
    """An attention share of full_s as a share of part_s, which holds all of that attention."""
    if attention_share is None or part_s <= 0:
        return attention_share
    return min(attention_share * full_s / part_s, 1.0)


def rest_of_prefill(fraction: float, attention_fraction: float, attention_share: float) -> float:
    """A prefill at some level took `fraction` of the full model's time, `attention_share` of which
    was attention, run there at `attention_fraction`: what the rest of it took, over the full
    model's rest (KnobCosts.prefill_fraction)."""
    share = min(max(attention_share, 0.0), MAX_OBSERVED_ATTENTION_SHARE)
    return min(max((fraction - attention_fraction * share) / (1.0 - share), 0.05), 2.0)
