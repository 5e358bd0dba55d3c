"""The iteration-level scheduler: each step, decide which tokens of which requests to run.

There are no phases, only tokens.  Every request has num_computed_tokens and num_tokens; each step
gives requests a number of tokens to compute under a token budget (max_num_batched_tokens).  A
decode is a request one token short; a prefill chunk is a request many tokens short; a prefix-
cache hit starts with num_computed_tokens > 0; recompute after preemption starts again from 0.

One step (split-and-fuse, as in Sarathi-Serve / Dynamic SplitFuse):
    the policy sets the token budget, then running and waiting requests are ranked together by
    the policy and walked in that order; each gets the tokens it still needs, cut to what budget
    is left and to what the policy lets its chunk (or decode) cost beside the step so far
    (limit_chunk; a request it gives 0 sits the step out, keeping its KV), while fewer
    than max_num_seqs requests are in the step.  Every policy ranks running
    decodes before running prefills before waiting requests within its own order, so decodes do
    not stall behind a long prompt; a long prompt is split over several steps, several short ones
    share one step.
When a running request cannot get KV blocks, the policy picks a victim among the running requests
not yet in this step (possibly the request itself); the victim's blocks are freed and it waits to
be recomputed.  A waiting request that finds no seat or KV may displace lower-ranked running work
only as its policy allows (Displacement).  A victim is never lost: it goes back to waiting.
Running requests the walk does not reach this step are paused: they keep their KV.

Prompt pruning changes only what a token costs and where a chunk may end (engine/prompt_pruning.py:
PrunePlan.chunk_size and cost); num_computed_tokens counts group 0's tokens, and the KV groups
(engine/kv/kv_cache_groups.py) derive each deep group's from it.  A preempted pruned request is recomputed
from 0 like any other, and its kept positions, reported by the runner when it scored the prompt,
go back with it, so the recompute keeps the same tokens.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from engine.kv.kv_cache_groups import KVCacheGroups
from engine.kv.kv_cache_manager import KVCacheManager
from engine.request import Request, RequestStatus
from engine.scheduler.output import ModelRunnerOutput, NewRequestData, ScheduledRequest, SchedulerOutput
from engine.scheduler.policy import AdmissionRejected, Displacement, SchedulingPolicy


class Scheduler:
    def __init__(self, kv_cache_manager: KVCacheManager | KVCacheGroups, policy: SchedulingPolicy, *,
                 max_num_batched_tokens: int, max_num_seqs: int, max_model_len: int,
                 clock: Callable[[], float] = time.time) -> None:
        """`kv_cache_manager`: the KV groups, or one manager (one group: no prompt pruning)."""
        if isinstance(kv_cache_manager, KVCacheManager):
            kv_cache_manager = KVCacheGroups(kv_cache_manager)
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
        self.num_rejected_total: dict[str, int] = {}  # reason -> requests the policy refused
        self._finished_since_last_step: set[str] = set()
        self._preempted_since_last_step: set[str] = set()

    # ---- request lifecycle -------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        self.add_requests([request])

    def add_requests(self, requests: list[Request]) -> None:
        """Add the samples of one request (n > 1 gives several) after the policy admits the first;
        AdmissionRejected leaves the scheduler unchanged."""
        for request in requests:
            if request.request_id in self.requests:
                raise ValueError(f"request id {request.request_id!r} is already in use")
        try:
            for request in requests:
                self.policy.on_arrival(request, self.waiting, self.running, self.clock())
        except AdmissionRejected as rejection:
            for request in requests:
                self.policy.on_finished(request)
            self.num_rejected_total[rejection.reason] = self.num_rejected_total.get(rejection.reason, 0) + 1
            raise
        for request in requests:
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
        now = self.clock()
        self.policy.prepare_step(self.running, self.waiting, now)
        step = _StepBuilder(budget=self.policy.token_budget(self.running, self.max_num_batched_tokens, now),
                            seats=self.max_num_seqs)
        ranked = sorted(self.running + self.waiting, key=lambda r: self.policy.rank_key(r, now))
        for request in ranked:
            if step.is_full:
                break
            if request.request_id in self._preempted_since_last_step:
                continue  # a victim earlier in this walk: it waits at least one step
            if request.status == RequestStatus.RUNNING:
                self._schedule_running(request, step, now)
            elif not self._admit(request, step, now) and self.policy.displacement == Displacement.NONE:
                break  # head-of-line: nothing ranked below it may jump ahead
        self.waiting = [r for r in self.waiting if r.status != RequestStatus.RUNNING]
        scheduled = sorted(step.scheduled, key=lambda s: s.num_scheduled_tokens != 1)  # decodes first, stable
        self.policy.on_scheduled(scheduled, now)
        output = SchedulerOutput(
            scheduled=scheduled,
            num_batched_tokens=sum(s.num_scheduled_tokens for s in scheduled),
            finished_request_ids=self._finished_since_last_step,
            preempted_request_ids=self._preempted_since_last_step,
        )
        self._finished_since_last_step = set()
        self._preempted_since_last_step = set()
        return output

    def _schedule_running(self, request: Request, step: _StepBuilder, now: float) -> None:
        num_new = self._num_new_tokens(request, step, now)
        if num_new == 0:
            return  # a pruned prompt whose window does not fit what is left of the budget
        total = request.num_computed_tokens + num_new
        while not self._allocate(request, total):
            victim = self.policy.pick_victim(self._unscheduled_running(step), now)
            self._preempt(victim)
            if victim is request:
                return
        step.add(self._scheduled(request, num_new))

    def _admit(self, request: Request, step: _StepBuilder, now: float) -> bool:
        """Start (or restart) a waiting request in this step if it gets a seat and KV."""
        displacement = self.policy.displacement
        if len(self.running) >= self.max_num_seqs and displacement != Displacement.PAUSE:
            if displacement == Displacement.NONE or not self._preempt_below(request, step, now):
                return False
        # Cached tokens are never computed, so they would have no logits to score: a request that
        # wants its prompt scored skips the lookup (as vLLM does); its own blocks are still cached.
        if not request.needs_prompt_logprobs:
            request.num_computed_tokens = self.kv.match_prefix(request.request_id, request.all_token_ids,
                                                              request.kv_cache_salt, request.prune_plan)
        num_new = self._num_new_tokens(request, step, now)
        total = request.num_computed_tokens + num_new
        while num_new == 0 or not self._allocate(request, total):
            if num_new == 0 or displacement == Displacement.NONE or not self._preempt_below(request, step, now):
                self.kv.free(request.request_id)  # hands back any prefix-cache hit
                request.num_computed_tokens = 0
                return False
        request.status = RequestStatus.RUNNING
        if request.metrics.first_scheduled_time is None:
            request.metrics.first_scheduled_time = now
        self.running.append(request)
        step.add(self._scheduled(request, num_new, starts=True))
        return True

    def _num_new_tokens(self, request: Request, step: _StepBuilder, now: float) -> int:
        """What is left of the token budget, then what the policy lets the chunk cost where it
        lies (a pruned prompt's chunk still ends outside its window)."""
        plan = request.prune_plan
        if plan is None:
            num_new = min(request.num_tokens_to_compute, step.budget)
        else:
            num_new = plan.chunk_size(request.num_computed_tokens, request.num_tokens_to_compute, step.budget)
        if num_new == 0:
            return 0
        limited = self.policy.limit_chunk(request, num_new, step.scheduled, now)
        if limited >= num_new or limited == 0 or plan is None:
            return limited
        return plan.chunk_size(request.num_computed_tokens, limited, limited)

    def _allocate(self, request: Request, num_total_tokens: int) -> bool:
        return self.kv.allocate_slots(request.request_id, num_total_tokens, request.all_token_ids,
                                      request.kv_cache_salt, request.prune_plan)

    def _preempt_below(self, request: Request, step: _StepBuilder, now: float) -> bool:
        """Preempt the lowest-ranked running request not in this step, if it ranks below `request`."""
        candidates = self._unscheduled_running(step)
        if not candidates:
            return False
        victim = self.policy.pick_victim(candidates, now)
        if self.policy.rank_key(victim, now) <= self.policy.rank_key(request, now):
            return False
        self._preempt(victim)
        return True

    def _unscheduled_running(self, step: _StepBuilder) -> list[Request]:
        return [r for r in self.running if r.request_id not in step.scheduled_ids]

    def _scheduled(self, request: Request, num_new: int, starts: bool = False) -> ScheduledRequest:
        """`starts`: the request (re)starts running this step, so the runner gets its tokens."""
        start, plan = request.num_computed_tokens, request.prune_plan
        stages = range(self.kv.num_stages)
        kept_start = tuple(start if plan is None else plan.num_kept(start, s) for s in stages)
        kept_end = tuple(start + num_new if plan is None else plan.num_kept(start + num_new, s) for s in stages)
        return ScheduledRequest(request=request, num_computed_tokens=start,
                                num_scheduled_tokens=num_new,
                                block_ids=self.kv.block_table(request.request_id),
                                samples=num_new == request.num_tokens_to_compute,
                                new_request=NewRequestData.of(request) if starts else None,
                                elastic_level=request.elastic_level,
                                kept_block_ids=self.kv.kept_block_tables(request.request_id),
                                num_kept_computed_tokens=kept_start,
                                num_kept_scheduled_tokens=tuple(e - b for b, e in zip(kept_start, kept_end)))

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
            kept = runner_output.kept_prompt_positions.get(request.request_id)
            if kept is not None:
                request.kept_prompt_positions = kept
            sampled = runner_output.sampled.get(request.request_id)
            if sampled is None:
                continue
            request.append_output_token(sampled.token_id)
            if request.metrics.first_token_time is None:  # policies pace decodes from it (SLO)
                request.metrics.first_token_time = self.clock()
            progressed.append(request)
            status = request.check_stop(self.max_model_len)
            if status is not None:
                self.running.remove(request)
                self._finish(request, status)
        return progressed

    def _finish(self, request: Request, status: RequestStatus) -> None:
        self.policy.on_finished(request)
        request.status = status
        self.kv.free(request.request_id)
        del self.requests[request.request_id]
        self._finished_since_last_step.add(request.request_id)


class _StepBuilder:
    """The requests of the step being built, and the token budget and seats still free."""

    def __init__(self, budget: int, seats: int) -> None:
        self.budget = budget
        self.seats = seats
        self.scheduled: list[ScheduledRequest] = []
        self.scheduled_ids: set[str] = set()

    @property
    def is_full(self) -> bool:
        return self.budget <= 0 or self.seats <= 0

    def add(self, item: ScheduledRequest) -> None:
        """Charge the item's cost: its tokens, or a pruned chunk's cost (PrunePlan.cost), which
        may overrun the budget in a stage-B step."""
        self.scheduled.append(item)
        self.scheduled_ids.add(item.request.request_id)
        plan = item.request.prune_plan
        self.budget -= (item.num_scheduled_tokens if plan is None
                        else plan.cost(item.num_computed_tokens, item.num_scheduled_tokens))
        self.seats -= 1
