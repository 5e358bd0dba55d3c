"""Scheduling policies: small objects that rank and choose, never allocate or compute.

The mechanism (token budget, chunking, KV allocation, preemption) lives in Scheduler and is the
same for every policy.  Each step the scheduler ranks running and waiting requests together with
`rank_key` and walks that order, giving each request its tokens while budget and seats last.  A
policy answers:
    how do requests rank right now                 -> rank_key (smaller first)
    what may a waiting request do to running work  -> displacement
    which running request is preempted             -> pick_victim
    how many tokens may this step run              -> token_budget
    how many of them may one request take          -> limit_chunk (a chunk, or a decode)
    is a new request admitted at all               -> on_arrival (raise AdmissionRejected)
and hears what happened (`prepare_step`, `on_scheduled`, `on_finished`) to keep its own per-request state.

Phases: within a policy's own order, running decodes come before running prefills, which come
before waiting requests, so that decodes never stall behind a long prefill.

`make_policy` (policy_factory.py) builds the policy a SchedulerConfig names.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING

from engine.request import Request, RequestStatus

if TYPE_CHECKING:
    from engine.scheduler.output import ScheduledRequest


class AdmissionRejected(Exception):
    """The policy refuses a new request (the server answers 429); `reason` labels the metric."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class Displacement(enum.Enum):
    """What a waiting request ranked above running work may do when seats or KV run out."""

    NONE = "none"  # wait (FCFS, SLO): running work keeps its seat and its KV
    PREEMPT = "preempt"  # recompute-preempt the lowest-ranked running request below it (priority)
    PAUSE = "pause"  # take its seat; the displaced request keeps its KV while memory allows (MLFQ)


def phase(request: Request) -> int:
    """0: a running decode, 1: a running prefill, 2: waiting (new or preempted)."""
    if request.status != RequestStatus.RUNNING:
        return 2
    return 0 if request.num_tokens_to_compute == 1 else 1


class SchedulingPolicy(ABC):
    name: str
    displacement = Displacement.NONE

    @abstractmethod
    def rank_key(self, request: Request, now: float) -> tuple:
        """Sort key over running and waiting requests; smaller keys are served first."""

    def pick_victim(self, candidates: Sequence[Request], now: float) -> Request:
        """The running request to preempt when KV runs out (candidates is non-empty): the lowest-ranked."""
        return max(candidates, key=lambda r: self.rank_key(r, now))

    def token_budget(self, running: Sequence[Request], max_budget: int, now: float) -> int:
        """Tokens this step may run; policies that guard latency shrink it."""
        return max_budget

    def limit_chunk(self, request: Request, num_new: int, scheduled: Sequence[ScheduledRequest], now: float) -> int:
        """The tokens (<= num_new) `request` may run in the step that already holds `scheduled`
        (a prefill chunk, or a decode's one token); 0: it sits this step out, keeping its KV.
        Policies that bound a step's time price the chunk where it lies."""
        return num_new

    def prepare_step(self, running: Sequence[Request], waiting: Sequence[Request], now: float) -> None:
        """Called once at the start of every step, before ranking (MLFQ promotes starved work)."""

    def on_arrival(self, request: Request, waiting: Sequence[Request], running: Sequence[Request],
                   now: float) -> None:
        """Admission control for a new request; raise AdmissionRejected to refuse it."""

    def on_scheduled(self, scheduled: Sequence[ScheduledRequest], now: float) -> None:
        """The step about to run (MLFQ counts service here)."""

    def on_finished(self, request: Request) -> None:
        """The request left the scheduler: drop any state kept for it."""


class FCFSPolicy(SchedulingPolicy):
    """First come, first served: oldest arrival first; the newest running request is preempted."""

    name = "fcfs"

    def rank_key(self, request: Request, now: float) -> tuple:
        return (phase(request), request.arrival_time, request.request_id)

    def pick_victim(self, candidates: Sequence[Request], now: float) -> Request:
        return max(candidates, key=lambda r: (r.arrival_time, r.request_id))


class PriorityPolicy(SchedulingPolicy):
    """vLLM's priority scheduling: lower `priority` first, ties by arrival.  A higher-priority
    arrival recompute-preempts the lowest-priority running request when seats or KV run out, so a
    full batch of low-priority work cannot block it (the inversion vLLM users report)."""

    name = "priority"
    displacement = Displacement.PREEMPT

    def rank_key(self, request: Request, now: float) -> tuple:
        return (request.priority, phase(request), request.arrival_time, request.request_id)

