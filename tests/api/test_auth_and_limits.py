"""A second server with --api-key and a tiny waiting queue: 401 without the key, 429 when full."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest

from .conftest import MODEL_NAME, ServerProcess

API_KEY = "sk-test-secret"


@pytest.fixture(scope="module")
def guarded_server() -> Iterator[ServerProcess]:
    process = ServerProcess("--api-key", API_KEY, "--max-num-seqs", "1", "--max-waiting-requests", "1")
    try:
        process.wait_ready()
        yield process
    finally:
        process.stop()


def test_api_key(guarded_server: ServerProcess) -> None:
    url = f"{guarded_server.base_url}/v1/models"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        response = httpx.get(url, headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(url, headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
    for open_path in ("/health", "/metrics", "/version"):  # for load balancers and Prometheus
        assert httpx.get(f"{guarded_server.base_url}{open_path}").status_code == 200
    client = openai.OpenAI(base_url=f"{guarded_server.base_url}/v1", api_key=API_KEY, max_retries=0)
    assert client.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=2).usage.completion_tokens == 2
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{guarded_server.base_url}/v1", api_key="nope", max_retries=0).models.list()


def test_too_many_waiting_requests(guarded_server: ServerProcess) -> None:
    body = {"prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True, "stream": True}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=guarded_server.base_url, headers=headers, timeout=60) as http:
        with http.stream("POST", "/v1/completions", json=body) as running:
            lines = running.iter_lines()  # keep a reference: a collected iterator closes the response
            next(lines)  # first token out: this one holds the only running slot
            with http.stream("POST", "/v1/completions", json=body) as waiting:
                assert waiting.status_code == 200, waiting.read()
                refused = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
                assert refused.status_code == 429, refused.text
                assert refused.headers["Retry-After"] == "1"
                assert set(refused.json()["error"]) == {"message", "type", "param", "code"}
        assert http.get("/health").status_code == 200
