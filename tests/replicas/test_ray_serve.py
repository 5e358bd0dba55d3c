"""`engine serve --replicas 2` on Ray Serve, over real HTTP on loopback: the OpenAI endpoints and
streams through the router, shared-prefix requests landing on one replica (counted from each
replica's own prefix-cache metrics in the router's /metrics), and a replica killed mid-stream:
its client gets an error event, not a hang, and Ray brings the replica back."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Iterator

import httpx
import pytest

from engine.replicas.launch import replica_argv
from tests.api.conftest import ServerProcess, running_server, scrape

pytest.importorskip("ray")

REPLICA_PROCESS = "ServeReplica:elastic-engine:EngineReplica"
LONG_PREFIX = ("You are a meticulous assistant. Read the following notes about the history of the printing press "
               "and answer the question at the end in one sentence. " * 6)


@pytest.fixture(scope="module")
def replicas() -> Iterator[ServerProcess]:
    yield from running_server("--replicas", "2", "--elastic", "off", "--max-num-seqs", "16", module="engine.cli")


def per_replica(base_url: str, name: str) -> dict[str, float]:
    """{replica label: value} of one counter, from the router's merged /metrics."""
    values: dict[str, float] = {}
    for key, value in scrape(base_url).items():
        if key.startswith(name + "{") and 'replica="' in key:
            replica = key.split('replica="', 1)[1].split('"', 1)[0]
            values[replica] = values.get(replica, 0.0) + value
    return values


def settled(base_url: str, name: str, wait_s: float = 3.0) -> dict[str, float]:
    time.sleep(wait_s)  # replicas post their metrics every second
    return per_replica(base_url, name)


DISTINCT_PROMPTS = ["Name a colour of the sky.", "What is seven times six?", "Translate 'cat' into French.",
                    "Give me a rhyme for moon.", "Which planet is largest?", "Spell the word necessary.",
                    "How many legs has a spider?", "Who wrote Hamlet?", "What melts ice quickly?",
                    "Describe rain briefly.", "List two prime numbers.", "Why do leaves fall?"]


def test_a_burst_at_start_is_spread_over_both_replicas(replicas):
    """The first test on the fresh app: the router reached every replica before it was ready, so a
    burst of unrelated requests does not all go to the first one it learnt of."""
    async def burst() -> list[int]:
        async with httpx.AsyncClient(base_url=replicas.base_url, timeout=120) as http:
            replies = await asyncio.gather(*(http.post("/v1/completions", json={
                "model": "SmolLM2-135M-Instruct", "prompt": prompt, "max_tokens": 4}) for prompt in DISTINCT_PROMPTS))
        return [reply.status_code for reply in replies]

    assert asyncio.run(burst()) == [200] * len(DISTINCT_PROMPTS)
    served = settled(replicas.base_url, "engine:request_success_total")
    assert len(served) == 2 and min(served.values()) >= 3, served


def test_openai_endpoints_and_streams_work_through_the_router(replicas):
    with httpx.Client(base_url=replicas.base_url, timeout=120) as http:
        models = http.get("/v1/models").json()
        assert models["data"][0]["id"] == "SmolLM2-135M-Instruct"
        reply = http.post("/v1/completions", json={"model": "SmolLM2-135M-Instruct", "prompt": "The capital of "
                                                   "France is", "max_tokens": 8, "temperature": 0}).json()
        assert reply["choices"][0]["finish_reason"] == "length" and reply["usage"]["completion_tokens"] == 8
        with http.stream("POST", "/v1/chat/completions", json={
                "model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": 6, "stream": True}) as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            events = [line for line in stream.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]" and len(events) >= 3
        bad = http.post("/v1/completions", json={"model": "SmolLM2-135M-Instruct", "prompt": "a", "max_tokens": -1})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_tokens"
    assert len(per_replica(replicas.base_url, "engine:prompt_tokens_total")) == 2


def test_shared_prefix_requests_land_on_one_replica(replicas):
    name = "engine:prefix_cache_queries_total"
    with httpx.Client(base_url=replicas.base_url, timeout=120) as http:
        for group, topic in enumerate(("the printing press", "the steam engine")):
            prefix = LONG_PREFIX.replace("the printing press", topic)
            before = settled(replicas.base_url, name)  # earlier tests' requests counted
            hits_before = per_replica(replicas.base_url, "engine:prefix_cache_hits_total")
            for question in range(5):
                response = http.post("/v1/completions", json={
                    "model": "SmolLM2-135M-Instruct", "prompt": f"{prefix}Question {question}: who?",
                    "max_tokens": 2, "temperature": 0})
                assert response.status_code == 200
            after = settled(replicas.base_url, name)
            hits = per_replica(replicas.base_url, "engine:prefix_cache_hits_total")
            grew = [r for r in after if after[r] > before.get(r, 0.0)]
            assert len(grew) == 1, f"group {group}'s requests spread over replicas: {before} -> {after}"
            assert hits[grew[0]] - hits_before.get(grew[0], 0.0) >= 4 * 100  # the last 4 reused the prefix


def test_a_replica_killed_mid_stream_ends_its_stream_with_an_error_and_comes_back(replicas):
    pids = subprocess.run(["pgrep", "-f", REPLICA_PROCESS], capture_output=True, text=True).stdout.split()
    assert len(pids) == 2
    with httpx.Client(base_url=replicas.base_url, timeout=120) as http:
        with http.stream("POST", "/v1/completions", json={
                "model": "SmolLM2-135M-Instruct", "prompt": "Tell me a long story about a dragon.",
                "max_tokens": 400, "ignore_eos": True, "stream": True}) as stream:
            lines = stream.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            assert '"text"' in first
            for pid in pids:  # whichever serves it
                os.kill(int(pid), signal.SIGKILL)
            start = time.monotonic()
            rest = [line for line in lines if line.startswith("data: ")]
            assert time.monotonic() - start < 30
        assert rest[-1] == "data: [DONE]" and "replica_failed" in rest[-2]
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:  # Ray restarts the replicas
            response = http.post("/v1/completions", json={"model": "SmolLM2-135M-Instruct", "prompt": "Hello",
                                                          "max_tokens": 2})
            if response.status_code == 200:
                break
            assert response.status_code == 503 and response.json()["error"]["code"] == "replica_failed"
            time.sleep(2)
        assert response.status_code == 200


def test_replica_flags_leave_out_the_launchers_own():
    assert replica_argv(["--replicas", "2", "--port=80", "--max-num-seqs", "8", "--host", "0.0.0.0",
                         "--max-replicas=4", "--elastic", "off"]) == ["--max-num-seqs", "8", "--elastic", "off"]
