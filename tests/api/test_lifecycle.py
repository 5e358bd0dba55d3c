"""The server's worst moments, on real processes: SIGTERM (and SIGINT) mid-stream drains (new
requests and /health get 503, running requests finish within --shutdown-timeout, the rest end
with an error event, the process exits 0 with no request or KV block left), and an engine loop
that dies takes the process down with a non-zero status instead of leaving its port open."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest

from .conftest import ServerProcess

POISON = 7777  # with the engine_loop fault injected, a prompt holding this token kills the loop


def stream_events(base_url: str, body: dict, into: list, first_token: threading.Event) -> None:
    with httpx.stream("POST", f"{base_url}/v1/completions", json={**body, "stream": True}, timeout=60) as response:
        into.append(response.status_code)
        for line in response.iter_lines():
            if line.startswith("data: "):
                into.append(line.removeprefix("data: "))
                first_token.set()


def start_stream(base_url: str, body: dict) -> tuple[threading.Thread, list, threading.Event]:
    events: list = []
    first = threading.Event()
    thread = threading.Thread(target=stream_events, args=(base_url, body, events, first), daemon=True)
    thread.start()
    assert first.wait(60), "no first token"
    return thread, events, first


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_drains_then_exits_zero(signum: int) -> None:
    server = ServerProcess("--shutdown-timeout", "4")
    try:
        server.wait_ready()
        short_thread, short, _ = start_stream(server.base_url, {"prompt": "Hello", "max_tokens": 40,
                                                                "ignore_eos": True})
        long_thread, long, _ = start_stream(server.base_url, {"prompt": "Tell me a story", "max_tokens": 1000,
                                                              "ignore_eos": True})
        server.process.send_signal(signum)
        time.sleep(0.5)
        refused = httpx.post(f"{server.base_url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=10)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "server_shutting_down"
        assert httpx.get(f"{server.base_url}/health", timeout=10).status_code == 503
        short_thread.join(30)
        long_thread.join(30)
        assert short[0] == 200 and short[-1] == "[DONE]"
        assert json.loads(short[-2])["choices"][0]["finish_reason"] == "length"  # finished within the timeout
        assert long[-1] == "[DONE]" and json.loads(long[-2])["error"]["code"] == "shutdown"
        assert server.process.wait(timeout=30) == 0
        log = server.log()
        assert "Engine loop stopped: 0 running, 0 waiting, KV cache usage 0.000" in log, log
    finally:
        server.stop()


def test_a_dead_engine_loop_exits_non_zero_and_ends_every_request() -> None:
    server = ServerProcess(env={"ELASTIC_ENGINE_INJECT_FAULT": f"engine_loop:{POISON}"})
    try:
        server.wait_ready()
        thread, events, _ = start_stream(server.base_url, {"prompt": "Tell me a story", "max_tokens": 1000,
                                                           "ignore_eos": True})
        fatal = httpx.post(f"{server.base_url}/v1/completions", json={"prompt": [1, POISON], "max_tokens": 4},
                           timeout=30)
        assert fatal.status_code == 500 and fatal.json()["error"]["code"] == "engine_loop"
        thread.join(30)
        assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "engine_loop"
        assert server.process.wait(timeout=30) == 1
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{server.base_url}/health", timeout=5)  # the port is closed, not open and dead
    finally:
        server.stop()
