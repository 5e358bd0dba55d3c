"""SLO-aware scheduling: per-request TTFT and TPOT targets.

    budget      each step's token budget is the largest whose predicted step time keeps the
                tightest TPOT target among running decodes (Sarathi-Serve's rule), never fewer
                than the decodes plus MIN_PREFILL_TOKENS, so prefills still make progress;
    order       running decodes, then prefills (started or waiting) in least-slack order (slack =
                TTFT deadline - now - predicted prefill time), lost deadlines after every feasible one;
    admission   a new request whose TTFT target the queue ahead of it already rules out is refused
                (AdmissionRejected -> HTTP 429) or, with best_effort, served after everyone else.

Step times come from a StepCostModel that the engine profiles at start-up and refines online.
The engine fills a request's missing targets from the server defaults (SLOConfig); requests with
no TTFT target at all are served in arrival order after every request that has a deadline.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from engine.config import SLOConfig
from engine.request import Request, SLOTarget
from engine.scheduler.cost_model import StepFeatures, features_of_chunks
from engine.scheduler.policy import AdmissionRejected, SchedulingPolicy, phase

if TYPE_CHECKING:
    from engine.scheduler.cost_model import StepCostModel

# Keep the predicted step time this far under the tightest TPOT target: the model is a fit.
TPOT_SAFETY = 0.9
# Prefill tokens every step keeps even under tight TPOT targets, so waiting work cannot starve.
MIN_PREFILL_TOKENS = 16
REJECT_REASON = "slo_ttft_unattainable"
NO_TARGET = SLOTarget()


class SLOPolicy(SchedulingPolicy):
    name = "slo"

    def __init__(self, config: SLOConfig, cost_model: StepCostModel, max_budget: int) -> None:
        self.config = config
        self.cost_model = cost_model
        self.max_budget = max_budget
        self._last_budget = max_budget

    @staticmethod
    def target(request: Request) -> SLOTarget:
        # The engine has already filled in the server-wide defaults (SLOConfig) for missing targets.
        return request.slo or NO_TARGET

    def deadline(self, request: Request) -> float:
        ttft_s = self.target(request).ttft_s
        return math.inf if ttft_s is None else request.arrival_time + ttft_s

    # ---- ranking -----------------------------------------------------------------------------

    def rank_key(self, request: Request, now: float) -> tuple:
        # Decodes first; then every prefill, started or not, by slack (a started one holds KV, but
        # a tighter deadline still goes first).  Slack is taken on the whole prefill, not on what
        # is left of it: on the remainder, equal deadlines would take turns chunk by chunk and
        # every one of them would finish late.
        if phase(request) == 0:
            return (0, False, 0.0, request.arrival_time, request.request_id)
        latest_start = self.deadline(request) - self.prefill_time_s(request.num_tokens)
        lost = request.best_effort or latest_start < now
        return (1, lost, latest_start, request.arrival_time, request.request_id)

    def prefill_time_s(self, num_tokens: int) -> float:
        """Predicted time to prefill num_tokens alone, in chunks of the current budget."""
        chunk = max(1, min(num_tokens, self._last_budget))
        return math.ceil(num_tokens / chunk) * self.cost_model.predict_s(StepFeatures.of_chunk(0, chunk, False))

    # ---- budget ------------------------------------------------------------------------------

    def token_budget(self, running: Sequence[Request], max_budget: int, now: float) -> int:
        decodes = [r for r in running if phase(r) == 0]
        tpot_targets = [t for t in (self.target(r).tpot_s for r in decodes) if t is not None]
        if not tpot_targets:
            self._last_budget = max_budget
            return max_budget
        room = max_budget - len(decodes)
        prefill_tokens = self.cost_model.max_chunk_tokens(
            _decode_features(decodes), num_computed_tokens=0, max_tokens=room,
            budget_s=min(tpot_targets) * TPOT_SAFETY)
        self._last_budget = len(decodes) + min(room, max(prefill_tokens, MIN_PREFILL_TOKENS))
        return self._last_budget

    # ---- admission ---------------------------------------------------------------------------

    def on_arrival(self, request: Request, waiting: Sequence[Request], running: Sequence[Request],
                   now: float) -> None:
        deadline = self.deadline(request)
        if math.isinf(deadline):
            return
        eta_s = self.first_token_eta_s(request, waiting, running)
        if now + eta_s <= deadline:
            return
        if self.config.best_effort:
            request.best_effort = True
            return
        raise AdmissionRejected(
            f"The TTFT target ({1000 * self.target(request).ttft_s:.0f} ms) cannot be met: about "
            f"{1000 * eta_s:.0f} ms of work is queued ahead of this request. Retry later or relax the target.",
            REJECT_REASON)

    def first_token_eta_s(self, request: Request, waiting: Sequence[Request], running: Sequence[Request]) -> float:
        """Predicted time until the request's first token: every prefill token due before it, and
        its own, at the prefill rate a step under the current budget leaves."""
        deadline = self.deadline(request)
        ahead = sum(r.num_tokens_to_compute for r in (*waiting, *running)
                    if phase(r) != 0 and not r.best_effort and self.deadline(r) <= deadline)
        num_tokens = ahead + request.num_prompt_tokens
        decodes = [r for r in running if phase(r) == 0]
        prefill_per_step = max(self._last_budget - len(decodes), MIN_PREFILL_TOKENS)
        step_s = self.cost_model.predict_s(_decode_features(decodes)
                                           + StepFeatures.of_chunk(0, prefill_per_step, False))
        return math.ceil(num_tokens / prefill_per_step) * step_s


def _decode_features(decodes: Sequence[Request]) -> StepFeatures:
    return features_of_chunks((r.num_computed_tokens, 1, True) for r in decodes)
