"""The SLO policy's choice of elastic settings for requests that leave it to the server (issue #15):
`"elastic": {"level": "auto", "prompt_keep": "auto"}`, or every request under `--elastic-auto`.

At light load every such request runs the full model on its whole prompt; as load rises, the
settings fall to the best quality whose predicted latency still meets the targets:

    level        chosen each step for all auto requests together.  Pressure is what the targets
                 ask of the full model: decode pressure = the predicted decode step at the full
                 level over the tightest running TPOT target (x TPOT safety); TTFT pressure =
                 max over waiting prompts, in deadline order, of the prefill time due up to and
                 including each over the time left to its deadline.  The level is the widest
                 whose fractions (knob_costs.py) bring both pressures under 1.  It falls as soon as
                 pressure rises, and climbs back one step at a time once the wider level fits with
                 CLIMB_MARGIN to spare, so a level does not flap at a boundary.  A request's floor
                 (min_level) caps how far its own level falls.  KV heads are never pruned, so a
                 running request may change level between any two steps.
    prompt_keep  chosen when the request arrives and again each step until its prefill starts
                 (its KV layout depends on it, so it is fixed from then): the largest keep of
                 KEEP_LADDER, at or above the request's floor, whose predicted first-token time
                 (the prefills due before it and its own at that keep) meets its TTFT target and
                 which the load allows (SLOPolicy.load_pressure: past what the full model could
                 serve, prompts are pruned first, since the quality table prices a keep far below
                 a level).  A prompt whose target is lost takes its smallest keep and its lowest
                 level.

Levels and keeps are ranked by the measured quality table (engine/elastic/quality_table.py); the
ladders below are its measured points, best first.  Torch-free.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from engine.elastic.quality_table import QualityTable
from engine.scheduler.knob_costs import KnobCosts

AUTO = "auto"  # what a request says to leave its level or prompt_keep to this choice
# prompt_keep values the choice tries, the whole prompt first; each is a measured point of the
# quality table (0.3: needle recall at 4k tokens equal to the whole prompt's, prompt_pruning.md).
KEEP_LADDER = (1.0, 0.5, 0.3)
# A level climbs back only when the next wider one would run at this fraction of what the targets
# allow: hysteresis, so that a pressure near a boundary does not make levels flap step to step.
CLIMB_MARGIN = 0.85


def allowed_keeps(min_keep: float | None, ladder: Sequence[float] = KEEP_LADDER) -> list[float]:
    """The ladder's keeps at or above a request's floor, best first (the whole prompt if none is)."""
    return [keep for keep in ladder if min_keep is None or keep >= min_keep] or [1.0]


@dataclass
class ElasticChoice:
    costs: KnobCosts
    quality: QualityTable
    level: int = 0  # the level auto requests run at now; 0 until the first choice (then a model level)

    def __post_init__(self) -> None:
        # Widest first: the order the choice walks, best quality first.
        self.levels = tuple(sorted(self.costs.levels, key=self.quality.level_quality, reverse=True))
        if not self.level:
            self.level = self.levels[0]

    def choose_level(self, decode_pressure: float, ttft_pressure: float, load_pressure: float = 0.0,
                     attention_share: float = 0.0) -> int:
        """The widest level whose decode and prefill fractions bring every pressure (full-level
        time over the time the targets allow; the load over what the full model can serve, with
        prompts already at their smallest keeps) to at most 1; the narrowest when none does.
        `attention_share`: of the prefill due, the share that is attention (KnobCosts.fraction)."""
        current = self.levels.index(self.level)
        chosen = len(self.levels) - 1
        for index, level in enumerate(self.levels):
            margin = CLIMB_MARGIN if index < current else 1.0  # climbing needs room to spare
            if self._load(level, decode_pressure, max(ttft_pressure, load_pressure), attention_share) <= margin:
                chosen = index
                break
        if chosen < current - 1:
            chosen = current - 1  # climb one level a step: load that just fell may come back
        self.level = self.levels[chosen]
        return self.level

    def level_for(self, min_level: int | None) -> int:
        """A request's level now: the chosen one, or its floor where that is higher."""
        if min_level is None or self.quality.level_quality(self.level) >= self.quality.level_quality(min_level):
            return self.level
        return min_level

    def lowest_level(self, min_level: int | None) -> int:
        """The narrowest level a request with this floor may run at."""
        return self.levels[-1] if min_level is None else min_level

    def choose_keep(self, fits: Callable[[float], bool], min_keep: float | None,
                    ladder: Sequence[float] = KEEP_LADDER) -> tuple[float, bool]:
        """(keep, whether it meets the TTFT): the largest keep of the ladder at or above the floor
        for which fits(keep), else the smallest allowed (the caller refuses or serves it best
        effort)."""
        allowed = allowed_keeps(min_keep, ladder)
        for keep in allowed:
            if fits(keep):
                return keep, True
        return allowed[-1], False

    def _load(self, level: int, decode_pressure: float, ttft_pressure: float, attention_share: float) -> float:
        return max(decode_pressure * self.costs.fraction(level, True),
                   ttft_pressure * self.costs.fraction(level, False, attention_share))
