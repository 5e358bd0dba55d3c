"""A server with several API keys, CORS for one origin, tight request limits, a request timeout
a request-read deadline and a fault injected into one prompt's detokenization
(engine/fault_injection.py): each limit is a 400 naming its field, a request past the timeout ends
with a 408 (its KV freed), a client too slow to send its request is disconnected, and the poisoned
request fails alone, counted in engine:request_errors_total, while others complete."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .conftest import MODEL_NAME, ServerProcess, metric, running_server, scrape

KEYS = ("sk-first", "sk-from-file")
POISON = 7777  # a token id: a prompt holding it fails as its tokens are turned into text
ORIGIN = "http://dashboard.example"
TIMEOUT_S = 4
READ_TIMEOUT_S = 2  # shorter than TIMEOUT_S: the 408 test shows responses are not cut by it


@pytest.fixture(scope="module")
def limited_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    key_file = Path(tmp_path_factory.mktemp("keys")) / "keys.txt"
    key_file.write_text(f"# one key a line\n\n{KEYS[1]}\n")
    yield from running_server("--api-key", KEYS[0], "--api-key-file", str(key_file), "--allowed-origins", ORIGIN,
                              "--max-n", "4", "--max-stop-string-chars", "8", "--max-logprobs", "5",
                              "--request-timeout", str(TIMEOUT_S), "--timeout-request-read", str(READ_TIMEOUT_S),
                              env={"ELASTIC_ENGINE_INJECT_FAULT": f"detokenize:{POISON}"})


@pytest.fixture(scope="module")
def http(limited_server: ServerProcess) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {KEYS[1]}"}
    with httpx.Client(base_url=limited_server.base_url, headers=headers, timeout=60) as client:
        yield client


def test_every_key_from_flag_and_file_opens_the_api(limited_server: ServerProcess) -> None:
    url = f"{limited_server.base_url}/v1/models"
    for key in KEYS:
        assert httpx.get(url, headers={"Authorization": f"Bearer {key}"}).status_code == 200
    for wrong in ("sk-firs", "sk-first-", KEYS[0] + KEYS[1], "# one key a line"):
        response = httpx.get(url, headers={"Authorization": f"Bearer {wrong}"})
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert KEYS[0] not in limited_server.log() and KEYS[1] not in limited_server.log()


@pytest.mark.parametrize(("body", "param"), [
    ({"n": 5}, "n"),
    ({"stop": ["123456789"]}, "stop"),
    ({"logprobs": 6}, "logprobs"),
    ({"prompt_logprobs": 6}, "prompt_logprobs"),
])
def test_limits_are_400s_naming_the_field(http: httpx.Client, body: dict, param: str) -> None:
    response = http.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "Hi", "max_tokens": 2, **body})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    within = {key: (4 if key == "n" else ["12345678"] if key == "stop" else 5) for key in body}
    assert http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2, **within}).status_code == 200


def test_cors_headers_only_for_the_allowed_origin(limited_server: ServerProcess, server: ServerProcess) -> None:
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    allowed = httpx.options(f"{limited_server.base_url}/v1/completions", headers=preflight)
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == ORIGIN
    other = httpx.options(f"{limited_server.base_url}/v1/completions",
                          headers={**preflight, "Origin": "http://elsewhere.example"})
    assert "access-control-allow-origin" not in other.headers
    default = httpx.get(f"{server.base_url}/v1/models", headers={"Origin": ORIGIN})  # no --allowed-origins
    assert default.status_code == 200 and "access-control-allow-origin" not in default.headers


def test_a_failing_request_fails_alone(limited_server: ServerProcess, http: httpx.Client) -> None:
    before = metric(scrape(limited_server.base_url), "engine:request_errors_total", reason="detokenize")
    healthy: dict = {}

    def neighbour() -> None:  # runs beside the poisoned requests, in the same batches
        healthy["response"] = http.post("/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 24,
                                                                 "ignore_eos": True})

    thread = threading.Thread(target=neighbour)
    thread.start()
    poisoned = http.post("/v1/completions", json={"prompt": [1, 504, POISON, 28], "max_tokens": 16, "n": 2})
    with http.stream("POST", "/v1/completions",
                     json={"prompt": [1, POISON], "max_tokens": 16, "stream": True}) as stream:
        events = [line.removeprefix("data: ") for line in stream.iter_lines() if line.startswith("data: ")]
    thread.join()
    assert poisoned.status_code == 500
    error = poisoned.json()["error"]
    assert error["code"] == "detokenize" and error["type"] == "server_error"
    assert "Traceback" not in error["message"] and "/" not in error["message"]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "detokenize"
    completed = healthy["response"]
    assert completed.status_code == 200 and completed.json()["usage"]["completion_tokens"] == 24
    samples = wait_for_idle(limited_server.base_url)
    assert metric(samples, "engine:request_errors_total", reason="detokenize") == before + 2
    assert metric(samples, "engine:kv_cache_usage_perc") == 0.0
    assert http.get("/health").status_code == 200


def test_a_request_past_the_timeout_ends_with_408_and_frees_its_kv(limited_server: ServerProcess,
                                                                    http: httpx.Client) -> None:
    body = {"prompt": "Tell me a long story.", "max_tokens": 1000, "ignore_eos": True}
    response = http.post("/v1/completions", json=body)  # ~1000 decode steps: far past 4 s
    assert response.status_code == 408 and response.json()["error"]["code"] == "request_timeout"
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as stream:
        events = [line.removeprefix("data: ") for line in stream.iter_lines() if line.startswith("data: ")]
    assert json.loads(events[-2])["error"]["code"] == "request_timeout"
    assert len(events) > 3  # tokens streamed before the timeout cut it short
    samples = wait_for_idle(limited_server.base_url)  # the aborts reach the engine thread a moment later
    assert metric(samples, "engine:request_errors_total", reason="timeout") == 2
    assert metric(samples, "engine:kv_cache_usage_perc") == 0


SLOW_REQUEST_STARTS = {
    "silent": b"",
    "headers_never_end": b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\n",
    "body_stops_halfway": (b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                           b"Authorization: Bearer " + KEYS[0].encode() + b"\r\nContent-Length: 100\r\n\r\n{\"prompt\": "),
}


@pytest.mark.parametrize("start", SLOW_REQUEST_STARTS.values(), ids=SLOW_REQUEST_STARTS.keys())
def test_a_client_too_slow_to_send_its_request_is_disconnected(limited_server: ServerProcess, start: bytes) -> None:
    """Slowloris: one more header line every 0.5 s never completes the request; the server closes
    the connection once the read deadline passes, without a response."""
    with socket.create_connection(("127.0.0.1", limited_server.port)) as sock:
        began = time.monotonic()
        sock.sendall(start)
        sock.settimeout(0.5)
        received, closed = b"", False
        while not closed and time.monotonic() - began < READ_TIMEOUT_S + 10:
            try:
                chunk = sock.recv(4096)
                received, closed = received + chunk, not chunk
            except TimeoutError:
                if start.endswith(b"\r\n"):
                    sock.sendall(b"X-Slow: %d\r\n" % time.monotonic_ns())
            except (ConnectionResetError, BrokenPipeError):
                closed = True
    assert closed and READ_TIMEOUT_S - 0.1 < time.monotonic() - began < READ_TIMEOUT_S + 5
    assert received == b""
    assert httpx.get(f"{limited_server.base_url}/health").status_code == 200


def test_the_read_deadline_restarts_with_each_request_on_a_kept_alive_connection(
        limited_server: ServerProcess) -> None:
    """Three requests on one connection, spread over longer than the read deadline, all answered."""
    with socket.create_connection(("127.0.0.1", limited_server.port)) as sock:
        sock.settimeout(10)
        began = time.monotonic()
        for _ in range(3):
            time.sleep(READ_TIMEOUT_S * 0.6)
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
            response = sock.recv(4096)
            assert response.startswith(b"HTTP/1.1 200"), response
        assert time.monotonic() - began > READ_TIMEOUT_S


def wait_for_idle(base_url: str, timeout_s: float = 10.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout_s
    while True:
        samples = scrape(base_url)
        if metric(samples, "engine:num_requests_running") == 0 or time.monotonic() > deadline:
            return samples
        time.sleep(0.1)


@pytest.mark.parametrize("flags", [["--timeout-request-read", "0"], ["--timeout-keep-alive", "-1"]])
def test_a_bad_timeout_flag_stops_the_server_with_a_message(flags: list[str]) -> None:
    import subprocess
    import sys
    result = subprocess.run([sys.executable, "-m", "engine.api.server", *flags], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode != 0
    assert f"engine serve: {flags[0][2:].replace('-', '_')} must be" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command, model", [(["-m", "engine.api.server"], "truncated"), (["-m", "engine.api.server"], "missing"),
                                            (["-m", "engine.cli", "generate", "hi"], "truncated")])
def test_a_model_that_cannot_load_stops_the_command_with_one_line(command: list[str], model: str,
                                                                  tmp_path) -> None:
    """A cut download or a wrong path: the command exits non-zero with one line naming the file."""
    import subprocess
    import sys

    from engine.model.loader import default_model_path
    path = tmp_path / "model.gguf"
    if model == "truncated":
        with open(default_model_path(), "rb") as whole:
            path.write_bytes(whole.read(5_000_000))  # the header and the vocabulary, then ends mid-tensor
    result = subprocess.run([sys.executable, *command, "--model", str(path)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if not line.startswith("INFO")]
    name = "serve" if "engine.api.server" in command else "generate"
    assert errors == [f"engine {name}: " + (f"{path}: tensor token_embd.weight runs past the end of the file"
                                           if model == "truncated" else
                                           f"model path {path} does not exist (models load from local disk only)")]
