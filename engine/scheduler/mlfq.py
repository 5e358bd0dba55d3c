"""FastServe's skip-join multi-level feedback queue (Wu et al., 2023).

Queue i has quantum base_quantum * 2**i service units (the last queue's is unbounded); a unit is
one decode step of the request, and prefill counts prefill_tokens_per_unit prompt tokens a unit.

    skip-join   a new request joins the highest queue whose quantum covers its prefill cost, so a
                long prompt does not first preempt everything at the top only to be demoted;
    demotion    a request that used up its queue's quantum drops one queue (service restarts);
    promotion   a request not served for starvation_s goes back to the top queue;
    order       lower queue first, first-in-queue first within a queue.

Requests displaced from the batch by higher-ranked work are paused: they keep their KV blocks
(Displacement.PAUSE) until memory runs short, when the lowest-ranked are recompute-preempted.
Invariant: every request the scheduler holds has a _QueueState from on_arrival to on_finished.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from engine.config import MLFQConfig
from engine.request import Request
from engine.scheduler.policy import Displacement, SchedulingPolicy

if TYPE_CHECKING:
    from engine.scheduler.output import ScheduledRequest


@dataclass(slots=True)
class _QueueState:
    level: int
    service: float  # units attained in the current queue
    enqueued_at: float  # when it entered the current queue: FCFS order within the queue
    last_served_at: float  # for starvation: arrival, then the start of each step that ran it


class MLFQPolicy(SchedulingPolicy):
    name = "mlfq"
    displacement = Displacement.PAUSE

    def __init__(self, config: MLFQConfig = MLFQConfig()) -> None:
        self.config = config
        self._states: dict[str, _QueueState] = {}
        self.num_demotions = 0
        self.num_promotions = 0

    def quantum(self, level: int) -> float:
        if level >= self.config.num_levels - 1:
            return math.inf
        return float(self.config.base_quantum * 2 ** level)

    def join_level(self, num_prompt_tokens: int) -> int:
        """Skip-join: the highest queue whose quantum covers the prefill's cost."""
        cost = math.ceil(num_prompt_tokens / self.config.prefill_tokens_per_unit)
        level = 0
        while self.quantum(level) < cost:
            level += 1
        return level

    def level_of(self, request: Request) -> int:
        return self._states[request.request_id].level

    def on_arrival(self, request: Request, waiting: Sequence[Request], running: Sequence[Request],
                   now: float) -> None:
        arrival = request.arrival_time
        self._states[request.request_id] = _QueueState(
            level=self.join_level(request.num_prompt_tokens), service=0.0, enqueued_at=arrival,
            last_served_at=arrival)

    def prepare_step(self, running: Sequence[Request], waiting: Sequence[Request], now: float) -> None:
        for requests in (running, waiting):
            for request in requests:
                state = self._states[request.request_id]
                if state.level > 0 and now - state.last_served_at > self.config.starvation_s:
                    state.level, state.service, state.enqueued_at = 0, 0.0, now
                    state.last_served_at = now  # a fresh starvation window at the top
                    self.num_promotions += 1

    def rank_key(self, request: Request, now: float) -> tuple:
        state = self._states[request.request_id]
        return (state.level, state.enqueued_at, request.arrival_time, request.request_id)

    def on_scheduled(self, scheduled: Sequence[ScheduledRequest], now: float) -> None:
        for item in scheduled:
            state = self._states[item.request.request_id]
            state.last_served_at = now
            state.service += self._units(item)
            if state.service >= self.quantum(state.level):
                state.level, state.service, state.enqueued_at = state.level + 1, 0.0, now
                self.num_demotions += 1

    def _units(self, item: ScheduledRequest) -> float:
        if item.num_scheduled_tokens == 1:
            return 1.0
        return item.num_scheduled_tokens / self.config.prefill_tokens_per_unit

    def on_finished(self, request: Request) -> None:
        self._states.pop(request.request_id, None)
