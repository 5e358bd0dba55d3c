"""SLO-aware scheduling: per-request TTFT and TPOT targets.

A TPOT target is a rate, not a step-by-step deadline: a request decoding at 40 ms a step with a
250 ms target may sit out several steps and still meet it.  This policy spends that slack: seats
go to the work whose target is closest to being missed, and everything else pauses (keeping its KV).

    budget      each step's token budget is the largest whose predicted step time keeps the
                tightest TPOT target among running decodes (Sarathi-Serve's rule), never fewer
                than the decodes plus MIN_PREFILL_TOKENS, so prefills still make progress;
    order       decodes about to miss their TPOT (their next token is due within URGENT_STEPS
                steps), then prefills whose TTFT is still reachable in least-slack order (slack =
                TTFT deadline - now - predicted prefill time), then decodes ahead of schedule, then
                work whose target is already lost;
    admission   a new request is refused (AdmissionRejected -> HTTP 429) or, with best_effort,
                served last when its TTFT target is out of reach (the prefills due before it, at
                the prefill rate the budget leaves) or when the decodes already admitted leave no
                seat time for one more at its TPOT target.

Step times come from a StepCostModel that the engine profiles at start-up and refines online.
The engine fills a request's missing targets from the server defaults (SLOConfig); requests with
no target at all are served after every request that has one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from engine.config import SLOConfig
from engine.request import Request, SLOTarget
from engine.scheduler.cost_model import StepFeatures, features_of_chunks
from engine.scheduler.policy import AdmissionRejected, Displacement, SchedulingPolicy, phase

if TYPE_CHECKING:
    from engine.scheduler.cost_model import StepCostModel
    from engine.scheduler.elastic_choice import ElasticChoice

# Keep the predicted step time this far under the tightest TPOT target: the model is a fit.
TPOT_SAFETY = 0.9
# Prefill tokens every step keeps even under tight TPOT targets, so waiting work cannot starve.
MIN_PREFILL_TOKENS = 16
# A decode is urgent when its next token is due within this many (predicted) steps.
URGENT_STEPS = 2.0
# Decode seat time admitted TPOT targets may claim, as a fraction of what steps of nothing but
# decodes would give (the rest is for prefills and for the step-to-step spread).
MAX_DECODE_SEAT_SHARE = 0.6
TTFT_REJECT_REASON = "slo_ttft_unattainable"
TPOT_REJECT_REASON = "slo_tpot_unattainable"
NO_TARGET = SLOTarget()


class SLOPolicy(SchedulingPolicy):
    name = "slo"
    displacement = Displacement.PAUSE

    def __init__(self, config: SLOConfig, cost_model: StepCostModel, max_budget: int, max_num_seqs: int,
                 choice: ElasticChoice | None = None) -> None:
        """`choice`: how requests that leave their elastic level or prompt_keep to the server get
        them (engine/scheduler/elastic_choice.py); None: such requests run the full model whole."""
        self.config = config
        self.cost_model = cost_model
        self.max_budget = max_budget
        self.max_num_seqs = max_num_seqs
        self.choice = choice
        self._last_budget = max_budget
        self._last_step_s = cost_model.predict_s(StepFeatures.of_chunk(0, max_budget, False))

    @staticmethod
    def target(request: Request) -> SLOTarget:
        # The engine has already filled in the server-wide defaults (SLOConfig) for missing targets.
        return request.slo or NO_TARGET

    def deadline(self, request: Request) -> float:
        ttft_s = self.target(request).ttft_s
        return math.inf if ttft_s is None else request.arrival_time + ttft_s

    # ---- ranking -----------------------------------------------------------------------------

    def rank_key(self, request: Request, now: float) -> tuple:
        if phase(request) == 0:
            slack = self.next_token_due(request) - now
            urgent = slack < URGENT_STEPS * self._last_step_s
            return (0 if urgent else 2, slack, request.arrival_time, request.request_id)
        # Slack is taken on the whole prefill, not on what is left of it: on the remainder, equal
        # deadlines would take turns chunk by chunk and every one of them would finish late.
        latest_start = self.deadline(request) - self.prefill_time_s(request.num_tokens)
        lost = request.best_effort or latest_start < now
        return (3 if lost else 1, latest_start, request.arrival_time, request.request_id)

    def next_token_due(self, request: Request) -> float:
        """When the next token must come for the request's mean TPOT to stay on target."""
        tpot_s = self.target(request).tpot_s
        first = request.metrics.first_token_time
        if tpot_s is None or first is None:
            return math.inf if tpot_s is None else -math.inf
        return first + tpot_s * request.num_output_tokens

    def prefill_time_s(self, num_tokens: int) -> float:
        """Predicted time to prefill num_tokens alone, in chunks of the current budget."""
        chunk = max(1, min(num_tokens, self._last_budget))
        return math.ceil(num_tokens / chunk) * self.cost_model.predict_s(StepFeatures.of_chunk(0, chunk, False))

    # ---- elastic settings (engine/scheduler/elastic_choice.py) ---------------------------------

    def prepare_step(self, running: Sequence[Request], waiting: Sequence[Request], now: float) -> None:
        """Choose this step's level for the requests that leave it to the server."""
        auto = [r for r in (*running, *waiting) if r.elastic_auto]
        if self.choice is None or not auto:
            return
        self.choice.choose_level(self.decode_pressure(running), self.ttft_pressure(running, waiting, now))
        for request in auto:
            request.elastic_level = self.choice.level_for(request.min_level)

    def decode_pressure(self, running: Sequence[Request]) -> float:
        """The predicted full-model step of the running decodes over the tightest of their TPOT
        targets, with its safety margin (prefill chunks fit in what is left: token_budget)."""
        decodes = [r for r in running if phase(r) == 0][:self.max_num_seqs]
        tpot_targets = [t for t in (self.target(r).tpot_s for r in decodes) if t is not None]
        if not tpot_targets:
            return 0.0
        return self.cost_model.predict_s(_decode_features(decodes)) / (min(tpot_targets) * TPOT_SAFETY)

    def ttft_pressure(self, running: Sequence[Request], waiting: Sequence[Request], now: float) -> float:
        """Max over prompts still to prefill, in deadline order, of the full-model prefill time
        due up to and including each over the time left to its deadline.  Prompts whose target is
        already lost do not count: they are served as such, and would pin the level down."""
        due = sorted((r for r in (*running, *waiting) if phase(r) != 0 and not r.best_effort
                      and math.isfinite(self.deadline(r))), key=self.deadline)
        pressure, tokens = 0.0, 0
        for request in due:
            left_s = self.deadline(request) - now
            if left_s <= 0:
                continue
            tokens += self.prefill_tokens(request)
            pressure = max(pressure, self.prefill_time_s(tokens) / left_s)
        return pressure

    def prefill_tokens(self, request: Request) -> float:
        """Full-model-equivalent prefill tokens the request still needs: its pruned prompt's
        deep layers run only the kept share (KnobCosts.keep_fraction)."""
        if self.choice is None or request.prompt_keep >= 1.0:
            return request.num_tokens_to_compute
        return request.num_tokens_to_compute * self.choice.costs.keep_fraction(request.prompt_keep)

    def _choose_prompt_keep(self, request: Request, waiting: Sequence[Request], running: Sequence[Request],
                            now: float) -> None:
        """An auto prompt_keep: the largest whose predicted first token meets the TTFT target."""
        deadline = self.deadline(request)

        def fits(keep: float) -> bool:
            request.choose_prompt_keep(keep)
            return now + self.first_token_eta_s(request, waiting, running) <= deadline

        keep, _ = self.choice.choose_keep(fits, request.min_prompt_keep, tuple(request.keep_options))
        request.choose_prompt_keep(keep)

    # ---- budget ------------------------------------------------------------------------------

    def token_budget(self, running: Sequence[Request], max_budget: int, now: float) -> int:
        decodes = [r for r in running if phase(r) == 0][:self.max_num_seqs]  # at most a step's worth
        tpot_targets = [t for t in (self.target(r).tpot_s for r in decodes) if t is not None]
        room = max_budget - len(decodes)
        prefill_tokens = room
        if tpot_targets:
            prefill_tokens = self.cost_model.max_chunk_tokens(
                _decode_features(decodes), num_computed_tokens=0, max_tokens=room,
                budget_s=min(tpot_targets) * TPOT_SAFETY)
        self._last_budget = len(decodes) + min(room, max(prefill_tokens, MIN_PREFILL_TOKENS))
        self._last_step_s = self.cost_model.predict_s(
            _decode_features(decodes) + StepFeatures.of_chunk(0, self._last_budget - len(decodes), False))
        return self._last_budget

    # ---- admission ---------------------------------------------------------------------------

    def on_arrival(self, request: Request, waiting: Sequence[Request], running: Sequence[Request],
                   now: float) -> None:
        target = self.target(request)
        if request.keep_options is not None and self.choice is not None:
            self._choose_prompt_keep(request, waiting, running, now)
        if target.ttft_s is not None:
            eta_s = self.first_token_eta_s(request, waiting, running)
            if now + eta_s > self.deadline(request):
                self._refuse(request, TTFT_REJECT_REASON,
                             f"The TTFT target ({1000 * target.ttft_s:.0f} ms) cannot be met: about "
                             f"{1000 * eta_s:.0f} ms of prefill is due before this request.")
                return
        if target.tpot_s is not None:
            admitted = [r for r in (*waiting, *running) if not r.best_effort]
            demand, supply = self.decode_seat_demand([*admitted, request]), self.decode_seat_supply()
            if request.elastic_auto and self.choice is not None:  # it may run down to its floor
                supply /= self.choice.costs.fraction(self.choice.lowest_level(request.min_level), True)
            if demand > MAX_DECODE_SEAT_SHARE * supply:
                self._refuse(request, TPOT_REJECT_REASON,
                             f"The TPOT target ({1000 * target.tpot_s:.0f} ms) cannot be met: with it the "
                             f"admitted requests would need {demand:.0f} of the {supply:.0f} decode seats a "
                             "second this server has.")

    def _refuse(self, request: Request, reason: str, message: str) -> None:
        if self.config.best_effort:
            request.best_effort = True
            return
        raise AdmissionRejected(message + " Retry later or relax the target.", reason)

    def first_token_eta_s(self, request: Request, waiting: Sequence[Request], running: Sequence[Request]) -> float:
        """Predicted time until the request's first token: every prefill token due before it, and
        its own, at the prefill rate the current budget leaves.  Seats are not the limit: decodes
        ahead of their TPOT schedule pause for prefills."""
        deadline = self.deadline(request)
        ahead = sum(self.prefill_tokens(r) for r in (*waiting, *running)
                    if phase(r) != 0 and not r.best_effort and self.deadline(r) <= deadline)
        num_tokens = math.ceil(ahead + self.prefill_tokens(request))
        decodes = [r for r in running if phase(r) == 0][:self.max_num_seqs]
        prefill_per_step = max(self._last_budget - len(decodes), MIN_PREFILL_TOKENS)
        step_s = self.cost_model.predict_s(_decode_features(decodes)
                                           + StepFeatures.of_chunk(0, prefill_per_step, False))
        return math.ceil(num_tokens / prefill_per_step) * step_s

    def decode_seat_demand(self, requests: Sequence[Request]) -> float:
        """Seats a second the requests' TPOT targets need: one seat a token each."""
        return sum(1 / t for t in (self.target(r).tpot_s for r in requests) if t is not None)

    def decode_seat_supply(self) -> float:
        """Decode seats a second if every step were a full step of decodes (no prefill); admission
        lets TPOT targets claim MAX_DECODE_SEAT_SHARE of it and leaves the rest to prefills."""
        full_decode_step_s = self.cost_model.predict_s(features_of_chunks([(0, 1, True)] * self.max_num_seqs))
        return self.max_num_seqs / max(full_decode_step_s, 1e-6)


def _decode_features(decodes: Sequence[Request]) -> StepFeatures:
    return features_of_chunks((r.num_computed_tokens, 1, True) for r in decodes)
