"""The bridge between the asyncio server and the synchronous `LLMEngine`.

    event loop thread                          engine thread
    -----------------                          -------------
    generate() --put--> command queue --drain before each step--> engine.add_request / abort_request
    RequestGroup <--call_soon_threadsafe(_deliver, batch)-- engine.step() outputs

Invariants: the LLMEngine is touched only from the engine thread; `_streams` only from the loop
thread.  The engine thread sleeps on `_wakeup` while the engine has no work.  Outputs are
cumulative, so a reader that falls behind skips to the newest one without losing anything.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from engine.api.errors import APIError
from engine.api.metrics import EngineMetrics
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


class RequestGroup:
    """The outputs of one API call's sub-requests (one per prompt), in arrival order.

    Iterating yields (index, RequestOutput) until every sub-request has finished; an engine-side
    error is raised.  `close()` aborts whatever is unfinished; call it in a `finally`.
    """

    def __init__(self, engine: AsyncEngine, request_ids: list[str], stream: asyncio.Queue[StreamItem]):
        self._engine = engine
        self.request_ids = request_ids
        self._stream = stream
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
        index, item = await self._stream.get()
        if isinstance(item, BaseException):
            raise item
        self._not_yet_accepted.discard(index)  # an output also means it was accepted
        return index, item

    def close(self) -> None:
        for index in self._unfinished:
            self._engine.abort(self.request_ids[index])
        self._unfinished.clear()


class AsyncEngine:
    def __init__(self, engine: Any, metrics: EngineMetrics | None = None,
                 max_waiting_requests: int | None = None) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_name: str = engine.model_name
        self.max_model_len: int = engine.max_model_len
        self.elastic_levels: tuple[int, ...] | None = engine.elastic_levels  # None: not elastic
        self.metrics = metrics
        self.max_waiting_requests = max_waiting_requests
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

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping.is_set()

    def generate(self, requests: list[tuple[str, list[int], SamplingParams]], priority: int = 0,
                 slo: SLOTarget | None = None, arrival_time: float | None = None,
                 elastic_level: int | str | None = None, prompt_keep: float | str | None = None,
                 floors: tuple[int | None, float | None] = (None, None)) -> RequestGroup:
        """Queue sub-requests (request_id, prompt_token_ids, params) and return their outputs.
        `arrival_time` (time.time()) is when the HTTP request came in; now if not given.
        `floors`: (min_level, min_prompt_keep) for settings left to the server ("auto")."""
        self._check_capacity(len(requests))
        stream: asyncio.Queue[StreamItem] = asyncio.Queue()
        arrival_time = time.time() if arrival_time is None else arrival_time
        for index, (request_id, prompt_token_ids, params) in enumerate(requests):
            self._streams[request_id] = (stream, index)
            self._commands.put(_Add(request_id, prompt_token_ids, params, priority, slo, arrival_time, elastic_level,
                                    prompt_keep, floors))
        self._num_adds_queued += len(requests)
        self._wakeup.set()
        return RequestGroup(self, [request_id for request_id, _, _ in requests], stream)

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
        while not self._stopping.is_set():
            batch: list[tuple[str, RequestOutput | BaseException]] = []
            try:
                self._drain_commands(batch)
                if self.engine.has_unfinished_requests():
                    self._step(batch)
                else:
                    self._publish_idle_stats()
            except Exception as e:  # an engine bug: fail the requests in flight, keep serving
                logger.exception("Engine step failed; aborting %d requests", len(self._num_samples))
                self._fail_all(batch, e)
            if batch:
                self._send(batch)
            if not batch and not self.engine.has_unfinished_requests() and self._commands.empty():
                self._wakeup.wait()
                self._wakeup.clear()

    def _drain_commands(self, batch: list[tuple[str, RequestOutput | BaseException]]) -> None:
        aborted: dict[str, int] = {}  # request id -> n
        refused = False
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
            if isinstance(command, _Abort):
                num_samples = self._num_samples.pop(command.request_id, None)
                if num_samples is not None:
                    aborted[command.request_id] = num_samples
                continue
            self._num_adds_drained += 1
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
                batch.append((command.request_id, APIError(f"Internal engine error: {e}", status=500,
                                                           type="server_error")))
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

    def _publish_idle_stats(self) -> None:
        # With no unfinished request nothing runs, waits or holds KV blocks.
        self._num_waiting = 0
        if self.metrics is not None:
            self.metrics.set_idle()

    def _fail_all(self, batch: list[tuple[str, RequestOutput | BaseException]], error: Exception) -> None:
        request_ids = list(self._num_samples)
        self._num_samples.clear()
        for request_id in request_ids:
            batch.append((request_id, APIError(f"Internal engine error: {error}", status=500,
                                               type="server_error")))
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
