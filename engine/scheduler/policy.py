"""Scheduling policies: small objects that order and choose, never allocate or compute.

The mechanism (token budget, chunking, KV allocation, preemption) lives in Scheduler and is the
same for every policy.  A policy answers three questions:
    which waiting request goes next        -> waiting_key (smaller first)
    which running request is preempted     -> pick_victim
    may this request be admitted now       -> can_admit
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from engine.request import Request


class SchedulingPolicy(ABC):
    name: str

    @abstractmethod
    def waiting_key(self, request: Request) -> tuple:
        """Sort key for the waiting queue; smaller keys are admitted first."""

    def running_key(self, request: Request) -> tuple:
        """Sort key for running requests when they claim budget; smaller first."""
        return self.waiting_key(request)

    @abstractmethod
    def pick_victim(self, candidates: list[Request]) -> Request:
        """The running request to preempt when KV blocks run out (candidates is non-empty)."""

    def can_admit(self, request: Request, now: float) -> bool:
        return True


class FCFSPolicy(SchedulingPolicy):
    """First come, first served: oldest arrival first; the newest running request is preempted."""

    name = "fcfs"

    def waiting_key(self, request: Request) -> tuple:
        return (request.arrival_time, request.request_id)

    def pick_victim(self, candidates: list[Request]) -> Request:
        return max(candidates, key=self.waiting_key)


def make_policy(name: str) -> SchedulingPolicy:
    policies = {"fcfs": FCFSPolicy}
    if name not in policies:
        raise ValueError(f"scheduling policy {name!r} is not available yet; available: {sorted(policies)}")
    return policies[name]()
