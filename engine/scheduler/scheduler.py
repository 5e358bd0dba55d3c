"""The iteration-level scheduler: each step, decide which tokens of which requests to run.

There are no phases, only tokens.  Every request has num_computed_tokens and num_tokens; each step
gives requests a number of tokens to compute under a token budget (max_num_batched_tokens).  A
decode is a request one token short; a prefill chunk is a request many tokens short; a prefix-
cache hit starts with num_computed_tokens > 0; recompute after preemption starts again from 0.

Order within a step (split-and-fuse, as in Sarathi-Serve / Dynamic SplitFuse):
    1. every running request one token short gets its decode token,
    2. running requests still in prefill get chunks from what budget is left,
    3. waiting requests are admitted, in policy order, into what budget is still left;
       a long prompt is split over several steps, several short ones share one step.
When a running request cannot get KV blocks, the policy picks a victim among the requests not yet
scheduled this step (possibly the request itself); the victim's blocks are freed and it waits to
be recomputed.  A victim is never lost: it goes back to the waiting queue.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from engine.kv.kv_cache_manager import KVCacheManager
from engine.request import Request, RequestStatus
from engine.scheduler.output import ModelRunnerOutput, ScheduledRequest, SchedulerOutput
from engine.scheduler.policy import SchedulingPolicy


class Scheduler:
    def __init__(self, kv_cache_manager: KVCacheManager, policy: SchedulingPolicy, *,
                 max_num_batched_tokens: int, max_num_seqs: int, max_model_len: int,
                 clock: Callable[[], float] = time.time) -> None:
        self.kv = kv_cache_manager
        # Where "now" comes from: wall time in the engine, a virtual clock in the simulator.
        self.clock = clock
        self.policy = policy
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions_total = 0
        self._finished_since_last_step: set[str] = set()
        self._preempted_since_last_step: set[str] = set()

    # ---- request lifecycle -------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def finish_requests(self, request_ids: Iterable[str], status: RequestStatus) -> list[Request]:
        """End requests (abort, or a stop string found by the engine); frees their KV now."""
        finished = []
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is None:
                continue
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            else:
                self.waiting.remove(request)
            self._finish(request, status)
            finished.append(request)
        return finished

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # ---- one step ----------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        budget = self._schedule_running(scheduled, budget)
        self._schedule_waiting(scheduled, budget)
        scheduled.sort(key=lambda s: s.num_scheduled_tokens != 1)  # decodes first, stable
        output = SchedulerOutput(
            scheduled=scheduled,
            num_batched_tokens=sum(s.num_scheduled_tokens for s in scheduled),
            finished_request_ids=self._finished_since_last_step,
            preempted_request_ids=self._preempted_since_last_step,
        )
        self._finished_since_last_step = set()
        self._preempted_since_last_step = set()
        return output

    def _schedule_running(self, scheduled: list[ScheduledRequest], budget: int) -> int:
        # Decodes (one token short) first, then running prefills, each group in policy order.
        ordered = sorted(self.running, key=lambda r: (r.num_tokens_to_compute > 1, self.policy.running_key(r)))
        scheduled_ids: set[str] = set()
        for request in ordered:
            if budget == 0:
                break
            if request.status != RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            num_new = min(request.num_tokens_to_compute, budget)
            if not self._allocate_or_preempt(request, num_new, scheduled_ids):
                continue
            scheduled.append(self._scheduled(request, num_new))
            scheduled_ids.add(request.request_id)
            budget -= num_new
        return budget

    def _allocate_or_preempt(self, request: Request, num_new: int, scheduled_ids: set[str]) -> bool:
        """Get KV for num_new more tokens of a running request, preempting others as needed.
        False if the request itself became the victim."""
        total = request.num_computed_tokens + num_new
        while not self.kv.allocate_slots(request.request_id, total):
            candidates = [r for r in self.running if r.request_id not in scheduled_ids]
            victim = self.policy.pick_victim(candidates)
            self._preempt(victim)
            if victim is request:
                return False
        return True

    def _schedule_waiting(self, scheduled: list[ScheduledRequest], budget: int) -> None:
        self.waiting.sort(key=self.policy.waiting_key)
        now = self.clock()
        admitted: list[Request] = []
        for request in self.waiting:
            if budget == 0 or len(self.running) >= self.max_num_seqs:
                break
            if not self.policy.can_admit(request, now):
                continue
            num_new = min(request.num_tokens_to_compute, budget)
            if not self.kv.allocate_slots(request.request_id, request.num_computed_tokens + num_new):
                break  # no preemption to admit new work: running requests keep their KV
            request.status = RequestStatus.RUNNING
            if request.metrics.first_scheduled_time is None:
                request.metrics.first_scheduled_time = now
            self.running.append(request)
            admitted.append(request)
            scheduled.append(self._scheduled(request, num_new))
            budget -= num_new
        if admitted:
            admitted_ids = {id(r) for r in admitted}
            self.waiting = [r for r in self.waiting if id(r) not in admitted_ids]

    def _scheduled(self, request: Request, num_new: int) -> ScheduledRequest:
        return ScheduledRequest(request=request, num_computed_tokens=request.num_computed_tokens,
                                num_scheduled_tokens=num_new,
                                block_ids=self.kv.block_table(request.request_id),
                                samples=num_new == request.num_tokens_to_compute)

    def _preempt(self, request: Request) -> None:
        """Recompute-style preemption: drop the KV, keep the tokens, wait again."""
        self.running.remove(request)
        self.kv.free(request.request_id)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.metrics.num_preemptions += 1
        self.num_preemptions_total += 1
        self.waiting.append(request)
        self._preempted_since_last_step.add(request.request_id)

    # ---- after the model ran -----------------------------------------------------------------

    def update_from_output(self, output: SchedulerOutput, runner_output: ModelRunnerOutput) -> list[Request]:
        """Advance computed tokens, append sampled tokens, finish requests that stop.
        Returns the requests that got a new token this step."""
        progressed = []
        for item in output.scheduled:
            request = item.request
            if request.is_finished:
                continue  # aborted while the step ran
            request.num_computed_tokens += item.num_scheduled_tokens
            sampled = runner_output.sampled.get(request.request_id)
            if sampled is None:
                continue
            request.append_output_token(sampled.token_id)
            progressed.append(request)
            status = request.check_stop(self.max_model_len)
            if status is not None:
                self.running.remove(request)
                self._finish(request, status)
        return progressed

    def _finish(self, request: Request, status: RequestStatus) -> None:
        request.status = status
        self.kv.free(request.request_id)
        del self.requests[request.request_id]
        self._finished_since_last_step.add(request.request_id)
