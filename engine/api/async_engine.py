"""The bridge between the asyncio server and the synchronous `LLMEngine`.

    event loop thread                          engine thread
    -----------------                          -------------
    generate() --put--> command queue --drain before each step--> engine.add_request / abort_request
    RequestGroup <--call_soon_threadsafe(_deliver, batch)-- engine.step() outputs

Invariants: the LLMEngine is touched only from the engine thread; `_streams` only from the loop
thread.  The engine thread sleeps on `_wakeup` while the engine has no work.  Outputs are
cumulative, so a reader that falls behind skips to the newest one without losing anything.

Lifecycle: `begin_drain` (SIGTERM, SIGINT) refuses new requests (503) and lets running ones
finish until a deadline, then ends the rest with an error; `run_engine_loop` then returns.  If the
loop itself dies (an error outside any one request), every request in flight ends with an error
and the error propagates, so `engine serve` exits non-zero instead of hanging with its port open.
Nothing accepted is lost: every request ends with its output or with an error its client reads.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

from engine.api.errors import APIError
from engine.api.limits import RequestLimits
from engine.api.metrics import EngineMetrics
from engine.fault_injection import FaultInjector
from engine.outputs import RequestOutput
from engine.request import SLOTarget
from engine.scheduler.policy import AdmissionRejected
from engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# Sent once the engine has taken a sub-request (before any output): it will not be refused now.
ACCEPTED = object()
# What a reader's queue receives: (index of the sub-request in its group, ACCEPTED, output or error).
StreamItem = tuple[int, RequestOutput | BaseException | object]


@dataclass(slots=True)
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int
    slo: SLOTarget | None
    arrival_time: float
    elastic_level: int | str | None = None
    prompt_keep: float | str | None = None
    floors: tuple[int | None, float | None] = (None, None)  # min_level, min_prompt_keep


@dataclass(slots=True)
class _Abort:
    request_id: str


def _shutting_down() -> APIError:
    return APIError("The server is shutting down.", status=503, code="server_shutting_down")


class _LoopFault(Exception):
    """The serving loop itself fails (the engine_loop fault hook): not one request's failure."""


class RequestGroup:
    """The outputs of one API call's sub-requests (one per prompt), in arrival order.

    Iterating yields (index, RequestOutput) until every sub-request has finished; an engine-side
    error is raised.  `close()` aborts whatever is unfinished; call it in a `finally`.
    """

    def __init__(self, engine: AsyncEngine, request_ids: list[str], stream: asyncio.Queue[StreamItem],
                 deadline: float | None = None):
        """`deadline`: time.time() past which the group ends with a timeout error (None: never)."""
        self._engine = engine
        self.request_ids = request_ids
        self._stream = stream
        self._deadline = deadline
        self._unfinished = set(range(len(request_ids)))
        self._not_yet_accepted = set(range(len(request_ids)))
        self._early: list[tuple[int, RequestOutput]] = []  # outputs read by `accepted`, not yet iterated

    def __aiter__(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        return self

    async def accepted(self) -> None:
        """Wait until the engine has taken every sub-request, raising the error of one it refused.
        Streaming replies wait here before sending their headers, so a refusal (400, 429) is a
        real HTTP status, not an error event inside a 200 stream."""
        while self._not_yet_accepted:
            index, item = await self._next_item()
            if isinstance(item, RequestOutput):
                self._early.append((index, item))

    async def __anext__(self) -> tuple[int, RequestOutput]:
        while self._unfinished:
            if self._early:
                index, item = self._early.pop(0)
            else:
                index, item = await self._next_item()
                if item is ACCEPTED:
                    continue
            if item.finished:
                self._unfinished.discard(index)
            return index, item
        raise StopAsyncIteration

    async def _next_item(self) -> tuple[int, RequestOutput | object]:
        if self._deadline is None:
            index, item = await self._stream.get()
        else:
            try:
                index, item = await asyncio.wait_for(self._stream.get(), max(0.0, self._deadline - time.time()))
            except TimeoutError:
                self._engine.record_timeout()
                raise APIError(f"The request did not finish within the server's request timeout "
                               f"({self._engine.request_timeout_s:g} s).", status=408, code="request_timeout") from None
        if isinstance(item, BaseException):
            raise item
        if isinstance(item, RequestOutput) and item.error is not None:
            reason, message = item.error
            raise APIError(message, status=500, type="server_error", code=reason)
        self._not_yet_accepted.discard(index)  # an output also means it was accepted
        return index, item

    def close(self) -> None:
        for index in self._unfinished:
            self._engine.abort(self.request_ids[index])
        self._unfinished.clear()


class AsyncEngine:
    def __init__(self, engine: Any, metrics: EngineMetrics | None = None,
                 max_waiting_requests: int | None = None, request_timeout_s: float | None = None,
                 limits: RequestLimits = RequestLimits(), check_invariants: bool = False) -> None:
        """`check_invariants`: check the KV bookkeeping each time the engine goes idle (a debug
        aid for soaks: engine:invariant_checks_total / engine:invariant_violations_total)."""
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_name: str = engine.model_name
        self.max_model_len: int = engine.max_model_len
        self.elastic_levels: tuple[int, ...] | None = engine.elastic_levels  # None: not elastic
        self.metrics = metrics
        self.max_waiting_requests = max_waiting_requests
        self.request_timeout_s = request_timeout_s  # None: a request may take as long as it needs
        self.limits = limits  # what one request may ask (engine/api/limits.py), read by the serving code
        self.check_invariants = check_invariants
        self._was_busy = False  # engine thread only: whether the last iteration had work
        self.faults = FaultInjector.from_env()  # a test hook (engine/fault_injection.py), None unless set
        self._draining = threading.Event()  # set by begin_drain: refuse new requests, finish the rest
        self._drain_deadline = float("inf")  # time.monotonic() when the rest are cut short
        self._commands: queue.SimpleQueue[_Add | _Abort] = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._owns_thread = False  # started by start(); else the caller's thread runs the loop
        self._loop: asyncio.AbstractEventLoop | None = None
        self._streams: dict[str, tuple[asyncio.Queue[StreamItem], int]] = {}  # loop thread only
        self._num_waiting = 0  # engine's waiting count, published by the engine thread
        # Adds queued and adds drained, each written by one thread only: their difference is the
        # number of requests the engine has not seen yet.
        self._num_adds_queued = 0
        self._num_adds_drained = 0
        self._num_samples: dict[str, int] = {}  # engine thread only: unfinished request id -> n

    # ---- loop thread ----

    def start(self, own_thread: bool = True) -> None:
        """Bind to the running event loop; step the engine on a new thread, or (own_thread=False)
        on whichever thread calls `run_engine_loop`."""
        self._loop = asyncio.get_running_loop()
        if own_thread:
            self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
            self._owns_thread = True
            self._thread.start()

    def run_engine_loop(self) -> None:
        """Step the engine on the calling thread until `shutdown`.

        PERF: `engine serve` steps on the main thread, the one that loaded the model.  On this
        CPU, torch's element-wise ops ran ~2x slower when a model built on the main thread was
        stepped from another thread (offline: 553 against 364 output tokens/s, 32 sequences).
        """
        self._thread = threading.current_thread()
        self._run()

    def shutdown(self) -> None:
        self._stopping.set()
        self._wakeup.set()
        if self._owns_thread and self._thread is not None:
            self._thread.join(timeout=10)

    def begin_drain(self, timeout_s: float) -> None:
        """Refuse new requests (503) from now; let the running ones finish for up to `timeout_s`,
        then end the rest with an error; the engine loop returns once nothing is left.  Safe
        from any thread, and from a signal handler."""
        self._drain_deadline = min(self._drain_deadline, time.monotonic() + timeout_s)
        self._draining.set()
        self._wakeup.set()

    @property
    def is_running(self) -> bool:
        """Healthy: the loop runs and takes new requests (not stopping, not draining)."""
        return (self._thread is not None and self._thread.is_alive() and not self._stopping.is_set()
                and not self._draining.is_set())

    def record_timeout(self) -> None:
        if self.metrics is not None:
            self.metrics.record_request_errors("timeout")

    def generate(self, requests: list[tuple[str, list[int], SamplingParams]], priority: int = 0,
                 slo: SLOTarget | None = None, arrival_time: float | None = None,
                 elastic_level: int | str | None = None, prompt_keep: float | str | None = None,
                 floors: tuple[int | None, float | None] = (None, None)) -> RequestGroup:
        """Queue sub-requests (request_id, prompt_token_ids, params) and return their outputs.
        `arrival_time` (time.time()) is when the HTTP request came in; now if not given.
        `floors`: (min_level, min_prompt_keep) for settings left to the server ("auto")."""
        if self._draining.is_set() or self._stopping.is_set():
            raise _shutting_down()
        self._check_capacity(len(requests))
        stream: asyncio.Queue[StreamItem] = asyncio.Queue()
        arrival_time = time.time() if arrival_time is None else arrival_time
        for index, (request_id, prompt_token_ids, params) in enumerate(requests):
            self._streams[request_id] = (stream, index)
            self._commands.put(_Add(request_id, prompt_token_ids, params, priority, slo, arrival_time, elastic_level,
                                    prompt_keep, floors))
        self._num_adds_queued += len(requests)
        self._wakeup.set()
        deadline = None if self.request_timeout_s is None else arrival_time + self.request_timeout_s
        return RequestGroup(self, [request_id for request_id, _, _ in requests], stream, deadline)

    def abort(self, request_id: str) -> None:
        if self._streams.pop(request_id, None) is not None:
            self._commands.put(_Abort(request_id))
            self._wakeup.set()

    def _check_capacity(self, num_new: int) -> None:
        if self.max_waiting_requests is None:
            return
        # Requests the engine has not seen yet will wait too.
        num_waiting = self._num_waiting + self._num_adds_queued - self._num_adds_drained
        if num_waiting + num_new > self.max_waiting_requests and num_waiting > 0:
            raise APIError(f"The server is busy: {num_waiting} requests are waiting. Retry later.",
                           status=429, code="too_many_waiting_requests", headers={"Retry-After": "1"})

    def _deliver(self, batch: list[tuple[str, RequestOutput | BaseException | object]]) -> None:
        for request_id, item in batch:
            entry = self._streams.get(request_id)
            if entry is None:
                continue  # aborted by its reader meanwhile
            stream, index = entry
            stream.put_nowait((index, item))
            if isinstance(item, BaseException) or (isinstance(item, RequestOutput) and item.finished):
                del self._streams[request_id]

    # ---- engine thread ----

    def _run(self) -> None:
        try:
            while not self._stopping.is_set() and not self._drained():
                self._run_once()
        except BaseException as e:  # the loop itself died: end everything in flight, then propagate
            logger.critical("The engine loop died (%s); ending %d requests", type(e).__name__, len(self._num_samples))
            self._stopping.set()
            batch: list[tuple[str, RequestOutput | BaseException]] = []
            self._fail_all(batch, "The engine stopped; this request could not finish.", "engine_loop")
            self._refuse_queued(batch)
            self._send(batch)
            raise
        self._end_all_in_flight()

    def _run_once(self) -> None:
        batch: list[tuple[str, RequestOutput | BaseException]] = []
        try:
            self._drain_commands(batch)
            if self._draining.is_set() and time.monotonic() >= self._drain_deadline:
                self._fail_all(batch, "The server shut down before this request finished.", "shutdown")
            elif self.engine.has_unfinished_requests():
                self._step(batch)
                self._was_busy = True
            else:
                self._publish_idle_stats()
                if self._was_busy and self.check_invariants:
                    self._check_idle_invariants()
                self._was_busy = False
        except _LoopFault:
            raise
        except Exception:  # an engine bug in this step: fail the requests in flight, keep serving
            logger.exception("Engine step failed; aborting %d requests", len(self._num_samples))
            self._fail_all(batch, "Internal engine error.", "engine_step")
        if batch:
            self._send(batch)
        if not batch and not self.engine.has_unfinished_requests() and self._commands.empty():
            self._wakeup.wait(timeout=self._idle_wait_s())
            self._wakeup.clear()

    def _idle_wait_s(self) -> float | None:
        # While draining, wake up for the deadline even if nothing arrives.
        return None if not self._draining.is_set() else max(0.0, self._drain_deadline - time.monotonic())

    def _drained(self) -> bool:
        """Draining and nothing is left: every accepted request has ended."""
        return (self._draining.is_set() and not self.engine.has_unfinished_requests()
                and self._commands.empty() and not self._num_samples)

    def _end_all_in_flight(self) -> None:
        """On a stop: whatever is still in flight ends with an error (nothing is left hanging)."""
        batch: list[tuple[str, RequestOutput | BaseException]] = []
        self._fail_all(batch, "The server shut down before this request finished.", "shutdown")
        self._refuse_queued(batch)
        stats = self.engine.get_stats()
        logger.info("Engine loop stopped: %d running, %d waiting, KV cache usage %.3f", stats.num_running,
                    stats.num_waiting, stats.kv_cache_usage)
        if batch:
            self._send(batch)

    def _drain_commands(self, batch: list[tuple[str, RequestOutput | BaseException]]) -> None:
        aborted: dict[str, int] = {}  # request id -> n
        refused = False
        for command in self._queued_commands():
            if isinstance(command, _Abort):
                num_samples = self._num_samples.pop(command.request_id, None)
                if num_samples is not None:
                    aborted[command.request_id] = num_samples
                continue
            self._num_adds_drained += 1
            if self.faults is not None:
                try:
                    self.faults.check("engine_loop", command.prompt_token_ids)
                except Exception as fault:
                    self._num_samples[command.request_id] = command.params.n  # in flight: it ends with the rest
                    raise _LoopFault() from fault
            if self._draining.is_set():  # queued before the drain began, drained after: refuse it too
                batch.append((command.request_id, _shutting_down()))
                continue
            try:
                self.engine.add_request(command.request_id, command.prompt_token_ids, command.params,
                                        arrival_time=command.arrival_time, priority=command.priority,
                                        slo=command.slo, elastic_level=command.elastic_level,
                                        prompt_keep=command.prompt_keep, min_level=command.floors[0],
                                        min_prompt_keep=command.floors[1])
                self._num_samples[command.request_id] = command.params.n
                batch.append((command.request_id, ACCEPTED))
            except AdmissionRejected as e:  # the scheduling policy refused it: come back later
                refused = True
                batch.append((command.request_id, APIError(str(e), status=429, code=e.reason,
                                                           headers={"Retry-After": "1"})))
            except ValueError as e:  # the engine refused it (InvalidRequestError and kin)
                batch.append((command.request_id, APIError(str(e), param=getattr(e, "param", None))))
            except Exception as e:  # an engine bug on this one request: fail it alone
                logger.exception("add_request failed for %s", command.request_id)
                batch.append((command.request_id, APIError(f"Internal engine error ({type(e).__name__}).",
                                                           status=500, type="server_error", code="internal")))
        if aborted:
            self.engine.abort_request(list(aborted))
            if self.metrics is not None:
                for request_id, num_samples in aborted.items():
                    self.metrics.record_abort(request_id, num_samples)
        stats = self.engine.get_stats()
        self._num_waiting = stats.num_waiting  # live: includes the requests just added
        if self.metrics is not None and refused:
            self.metrics.record_totals(stats)  # rejections show even if nothing runs

    def _step(self, batch: list[tuple[str, RequestOutput | BaseException]]) -> None:
        outputs = self.engine.step()
        stats = self.engine.get_stats()
        self._num_waiting = stats.num_waiting
        for output in outputs:
            if output.finished:
                self._num_samples.pop(output.request_id, None)
            batch.append((output.request_id, output))
        if self.metrics is not None:
            self.metrics.record_step(stats)
            self.metrics.record_outputs(outputs, time.time())

    def _check_idle_invariants(self) -> None:
        """Idle: the KV bookkeeping must be consistent and hold no request's blocks."""
        try:
            self.engine.check_invariants()
            assert self.engine.get_stats().kv_cache_usage == 0.0, "KV blocks in use with nothing running"
            failed = False
        except AssertionError:
            logger.exception("KV invariants failed at an idle moment")
            failed = True
        if self.metrics is not None:
            self.metrics.invariant_checks.inc()
            if failed:
                self.metrics.invariant_violations.inc()

    def _publish_idle_stats(self) -> None:
        # With no unfinished request nothing runs, waits or holds KV blocks.
        self._num_waiting = 0
        if self.metrics is not None:
            self.metrics.set_idle()

    def _refuse_queued(self, batch: list[tuple[str, RequestOutput | BaseException]]) -> None:
        """Adds the engine never took (the loop stopped first): refused, as if they came later."""
        for command in self._queued_commands():
            if isinstance(command, _Add):
                batch.append((command.request_id, _shutting_down()))

    def _queued_commands(self) -> Iterator[_Add | _Abort]:
        """The commands queued so far, taken off the queue one by one."""
        while True:
            try:
                yield self._commands.get_nowait()
            except queue.Empty:
                return

    def _fail_all(self, batch: list[tuple[str, RequestOutput | BaseException]], message: str, reason: str) -> None:
        """End every request in flight with an error (`reason`: engine:request_errors_total's
        label); no traceback or path reaches the client, the log has them."""
        request_ids = list(self._num_samples)
        self._num_samples.clear()
        status = 503 if reason == "shutdown" else 500
        for request_id in request_ids:
            batch.append((request_id, APIError(message, status=status, type="server_error", code=reason)))
        if self.metrics is not None and request_ids:
            self.metrics.record_request_errors(reason, len(request_ids))
            for request_id in request_ids:
                self.metrics.forget(request_id)
        try:
            self.engine.abort_request(request_ids)
        except Exception:
            logger.exception("Aborting after an engine error failed")

    def _send(self, batch: list[tuple[str, RequestOutput | BaseException]]) -> None:
        # PERF: one wakeup of the event loop per step, not one per request.
        try:
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self._deliver, batch)
        except RuntimeError:  # loop closed during shutdown
            pass
