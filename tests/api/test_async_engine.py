"""AsyncEngine's thread bridge and the metrics it records, against a fake LLMEngine (milliseconds)."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest

from engine.llm_engine import EngineStats
from engine.api.async_engine import AsyncEngine
from engine.api.errors import APIError
from engine.api.metrics import EngineMetrics, StatLogger
from engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from engine.sampling_params import SamplingParams

BAD_PROMPT = [99]


@dataclass
class FakeRequest:
    params: SamplingParams
    prompt_token_ids: list[int]
    metrics: RequestMetrics
    token_ids: list[int] = field(default_factory=list)


class FakeEngine:
    """Emits token 7 once per step for every request; remembers which threads touched it."""

    def __init__(self) -> None:
        self.tokenizer = SimpleNamespace(vocab_size=100)
        self.model_name, self.max_model_len = "fake", 64
        self.elastic_levels = None  # not an elastic model
        self.requests: dict[str, FakeRequest] = {}
        self.aborted: list[str] = []
        self.thread_ids: set[int] = set()
        self.fail_next_step = False
        self.num_steps = 0

    def add_request(self, request_id, prompt, params, *, arrival_time=None, priority=0, slo=None,
                    elastic_level=None, prompt_keep=None, min_level=None, min_prompt_keep=None) -> None:
        self.thread_ids.add(threading.get_ident())
        if prompt == BAD_PROMPT:
            error = ValueError("bad prompt")
            error.param = "prompt"
            raise error
        self.requests[request_id] = FakeRequest(params, prompt, RequestMetrics(arrival_time or time.time()))

    def step(self) -> list[RequestOutput]:
        self.thread_ids.add(threading.get_ident())
        self.num_steps += 1
        if self.fail_next_step:
            self.fail_next_step = False
            raise RuntimeError("boom")
        time.sleep(0.002)
        outputs, now = [], time.time()
        for request_id, request in list(self.requests.items()):
            request.token_ids.append(7)
            request.metrics.first_scheduled_time = request.metrics.first_scheduled_time or now
            request.metrics.first_token_time = request.metrics.first_token_time or now
            request.metrics.last_token_time = now
            finished = len(request.token_ids) >= request.params.max_tokens
            if finished:
                request.metrics.finished_time = now
                del self.requests[request_id]
            completion = CompletionOutput(0, "x" * len(request.token_ids), list(request.token_ids),
                                          finish_reason="length" if finished else None)
            outputs.append(RequestOutput(request_id, None, request.prompt_token_ids, [completion], finished,
                                         request.metrics))
        return outputs

    def abort_request(self, request_ids: list[str]) -> None:
        self.thread_ids.add(threading.get_ident())
        for request_id in request_ids:
            if self.requests.pop(request_id, None) is not None:
                self.aborted.append(request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def get_stats(self):
        return EngineStats(num_running=len(self.requests), num_waiting=0, kv_cache_usage=0.5 * bool(self.requests),
                           num_preemptions_total=0, num_prompt_tokens_step=1, num_generation_tokens_step=1,
                           num_batched_tokens_step=2)


def run(coro_fn, max_waiting_requests: int | None = None):
    fake = FakeEngine()
    metrics = EngineMetrics("fake", 64)
    engine = AsyncEngine(fake, metrics, max_waiting_requests)

    async def main():
        engine.start()
        try:
            return await asyncio.wait_for(coro_fn(engine, fake), timeout=10)
        finally:
            engine.shutdown()

    return asyncio.run(main()), fake, metrics


def sample(metrics: EngineMetrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, {"model_name": "fake", **labels}) or 0.0


def test_outputs_flow_and_engine_is_touched_from_one_thread() -> None:
    async def go(engine: AsyncEngine, fake: FakeEngine):
        group = engine.generate([("a", [1, 2], SamplingParams(max_tokens=3)), ("b", [3], SamplingParams(max_tokens=5))])
        finals = {}
        async for index, output in group:
            finals[index] = output
        return finals

    finals, fake, metrics = run(go)
    assert [len(finals[i].outputs[0].token_ids) for i in (0, 1)] == [3, 5]
    assert len(fake.thread_ids) == 1 and threading.get_ident() not in fake.thread_ids
    assert sample(metrics, "engine:request_success_total", finished_reason="length") == 2
    assert sample(metrics, "engine:time_to_first_token_seconds_count") == 2
    assert sample(metrics, "engine:inter_token_latency_seconds_count") == 2 + 4
    assert sample(metrics, "engine:request_generation_tokens_sum") == 8
    assert sample(metrics, "engine:prompt_tokens_total") == fake.num_steps


def test_engine_rejection_reaches_the_caller() -> None:
    async def go(engine: AsyncEngine, fake: FakeEngine):
        group = engine.generate([("bad", BAD_PROMPT, SamplingParams(max_tokens=2))])
        with pytest.raises(APIError) as info:
            async for _ in group:
                pass
        return info.value

    error, _, _ = run(go)
    assert error.status == 400 and error.param == "prompt"


def test_close_aborts_and_frees() -> None:
    async def go(engine: AsyncEngine, fake: FakeEngine):
        group = engine.generate([("long", [1], SamplingParams(max_tokens=10_000))])
        await group.__anext__()
        group.close()
        for _ in range(200):
            if fake.aborted:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # one more loop pass publishes the idle gauges

    _, fake, metrics = run(go)
    assert fake.aborted == ["long"] and not fake.requests
    assert sample(metrics, "engine:request_success_total", finished_reason="abort") == 1
    assert sample(metrics, "engine:num_requests_running") == 0
    assert sample(metrics, "engine:kv_cache_usage_perc") == 0


def test_a_failing_step_fails_its_requests_but_not_the_loop(caplog: pytest.LogCaptureFixture) -> None:
    async def go(engine: AsyncEngine, fake: FakeEngine):
        fake.fail_next_step = True
        with pytest.raises(APIError) as info:
            async for _ in engine.generate([("doomed", [1], SamplingParams(max_tokens=5))]):
                pass
        assert info.value.status == 500
        outputs = [o async for _, o in engine.generate([("fine", [1], SamplingParams(max_tokens=2))])]
        return outputs[-1], engine.is_running

    with caplog.at_level(logging.ERROR):
        (last, is_running), _, _ = run(go)
    assert last.finished and is_running and "boom" in caplog.text


def test_waiting_limit() -> None:
    async def go(engine: AsyncEngine, fake: FakeEngine):
        engine.generate([("first", [1], SamplingParams(max_tokens=50))])  # undrained: counts as waiting
        with pytest.raises(APIError) as info:
            engine.generate([("second", [1], SamplingParams(max_tokens=50))])
        return info.value

    error, _, _ = run(go, max_waiting_requests=1)
    assert error.status == 429 and error.headers == {"Retry-After": "1"}


def test_stat_logger_line(caplog: pytest.LogCaptureFixture) -> None:
    stats = SimpleNamespace(num_running=3, num_waiting=1, kv_cache_usage=0.25, num_prompt_tokens_step=100,
                            num_generation_tokens_step=20)
    stat_logger = StatLogger(interval_s=10.0, last_log_time=0.0)
    with caplog.at_level(logging.INFO, logger="engine.api.metrics"):
        stat_logger.record(stats, 5.0)
        assert not caplog.text
        stat_logger.record(stats, 10.0)
    assert ("Avg prompt throughput: 20.0 tokens/s, Avg generation throughput: 4.0 tokens/s, "
            "Running: 3 reqs, Waiting: 1 reqs, KV cache usage: 25.0%") in caplog.text
