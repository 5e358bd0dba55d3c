"""The SLO policy's choice of elastic settings for requests that leave it to the server (issue #15):
`"elastic": {"level": "auto", "prompt_keep": "auto"}`, or every request under `--elastic-auto`.

At light load every such request runs the full model on its whole prompt; as load rises, the
settings fall to the best quality whose predicted latency still meets the targets:

    level        chosen each step for all auto prompts together, and apart for all auto decodes.
                 Pressure is what the targets ask of the full model: decode pressure = the
                 predicted decode step at the full level over the tightest running TPOT target
                 (x TPOT safety); TTFT pressure = max over waiting prompts, in deadline order, of
                 the prefill time due up to and including each over the time left to its
                 deadline.  The prompts' level is the widest whose fractions (knob_costs.py) bring
                 both pressures, and the load, under 1; the decodes' (`decode_level`), while the
                 full model could serve the load on whole prompts, answers only the decode pressure
                 and the load, so a document's TTFT pressure lowers the prompts, whose level buys
                 it most of what it needs, and leaves the chats decoding beside it on their level
                 (past that load the decodes follow the prompts' level).  Both fall as soon as
                 pressure rises, and climb back one step at a time once the wider level fits with
                 CLIMB_MARGIN to spare, so a level does not flap at a boundary.  A request's floor
                 (min_level) caps how far its own level falls.  KV heads are never pruned, so a
                 running request may change level between any two steps (and does, from the
                 prompts' level to the decodes', when its first token comes).
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
    level: int = 0  # the level auto prompts run at now; 0 until the first choice (then a model level)
    # The level auto decodes run at now: as `level`, less the TTFT pressure while the load allows
    # (choose_level).  Invariant: decode_level is `level` or wider.
    decode_level: int = 0

    def __post_init__(self) -> None:
        # Widest first: the order the choice walks, best quality first.
        self.levels = tuple(sorted(self.costs.levels, key=self.quality.level_quality, reverse=True))
        if not self.level:
            self.level = self.levels[0]
        if not self.decode_level:
            self.decode_level = self.level

    def choose_level(self, decode_pressure: float, ttft_pressure: float, load_pressure: float = 0.0,
                     attention_share: float = 0.0, whole_prompt_load: float = 0.0) -> int:
        """The prompts' level: the widest whose decode and prefill fractions bring every pressure
        (full-level time over the time the targets allow; the load over what the full model can
        serve, with prompts already at their smallest keeps) to at most 1; the narrowest when none
        does.  `attention_share`: of the prefill due, the share that is attention
        (KnobCosts.fraction).

        Also the decodes' level (`decode_level`).  While the full model could serve the load on
        whole prompts (`whole_prompt_load`: the load at keep 1, at most 1) it answers the decode
        pressure and the load alone: a TTFT pressure is then a burst, and the prompts' own level
        answers it.  Past that load every row gives: the decodes run at the prompts' level.
        Measured (auto alone replayed on #15's run-34 trace and targets, taking turns with the
        code before, Intel Xeon; benchmarks/README.md, "The decodes' own level"): at 0.5x load,
        requests wholly at level 100 on the whole prompt 93% against 84% (the chats and batch
        requests decoding beside a document's TTFT burst had left level 100 for a few tokens);
        decodes apart at every load cost 1.5x's attainment 0.83 against 0.87 (the lowered decodes
        had left the chats room beside hurried documents); with this switch 0.853 against 0.869.
        Where the two levels parted, the load at keep 1 was 0.68-0.93 at 0.5x, 1.03-1.18 at 1.5x."""
        prefill_pressure = max(ttft_pressure, load_pressure)
        self.level = self._next_level(
            self.level, lambda level: self._load(level, decode_pressure, prefill_pressure, attention_share))
        if whole_prompt_load > 1.0:
            self.decode_level = self.level
            return self.level
        decode_level = self._next_level(
            self.decode_level, lambda level: max(decode_pressure, load_pressure) * self.costs.fraction(level, True))
        self.decode_level = min(decode_level, self.level, key=self.levels.index)  # the wider of the two
        return self.level

    def _next_level(self, current_level: int, load: Callable[[int], float]) -> int:
        """The widest level whose load(level) is at most 1 (the narrowest when none is), climbing
        from current_level at most one level, and only with CLIMB_MARGIN to spare."""
        current = self.levels.index(current_level)
        chosen = len(self.levels) - 1
        for index, level in enumerate(self.levels):
            margin = CLIMB_MARGIN if index < current else 1.0  # climbing needs room to spare
            if load(level) <= margin:
                chosen = index
                break
        if chosen < current - 1:
            chosen = current - 1  # climb one level a step: load that just fell may come back
        return self.levels[chosen]

    def level_for(self, min_level: int | None, decoding: bool = False) -> int:
        """A request's level now: the chosen one (`decode_level` for a request that is decoding),
        or its floor where that is higher."""
        level = self.decode_level if decoding else self.level
        if min_level is None or self.quality.level_quality(level) >= self.quality.level_quality(min_level):
            return level
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
