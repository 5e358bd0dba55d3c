"""One streaming OpenAI request, timed from the client's side: /v1/completions or /v1/chat/completions.

Speaks the subset every OpenAI-compatible server understands (ours, llama.cpp's llama-server,
vLLM): `stream` with `stream_options.include_usage`, `max_tokens`, `temperature`, and the vLLM
extra `ignore_eos`.  Timing follows `vllm bench serve`: TTFT is the first chunk with content, ITL
the gaps between content chunks (a chunk may carry several tokens), output tokens the final
usage chunk's `completion_tokens` (the number of content chunks when a server sends no usage).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from engine.bench.datasets import SampleRequest
from engine.bench.metrics import RequestRecord

COMPLETIONS = "/v1/completions"
CHAT_COMPLETIONS = "/v1/chat/completions"
ENDPOINTS = (COMPLETIONS, CHAT_COMPLETIONS)
REQUEST_TIMEOUT_S = 6 * 3600.0  # one request may wait behind a long queue; vLLM allows 6 h too
MAX_ERROR_CHARS = 300


@dataclass(frozen=True)
class RequestOptions:
    """What every request of a run shares."""

    model: str
    endpoint: str = COMPLETIONS
    ignore_eos: bool = False
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None

    def __post_init__(self) -> None:
        if self.endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint must be one of {', '.join(ENDPOINTS)}, got {self.endpoint!r}")


def request_body(request: SampleRequest, options: RequestOptions, max_tokens: int | None = None) -> dict[str, Any]:
    """The JSON body for `request`: greedy, `max_tokens` = its expected output length unless given."""
    max_tokens = request.expected_output_len if max_tokens is None else max_tokens
    body: dict[str, Any] = {"model": options.model, "max_tokens": max_tokens, "temperature": 0.0,
                            "stream": True, "stream_options": {"include_usage": True}}
    if options.endpoint == CHAT_COMPLETIONS:
        body["messages"] = request.chat_messages or [{"role": "user", "content": request.prompt}]
        body["max_completion_tokens"] = max_tokens  # the newer OpenAI name; servers read one or the other
    else:
        # Exact ids where the dataset has them (random prompts need not re-encode to the same count).
        body["prompt"] = request.prompt_token_ids if request.prompt_token_ids is not None else request.prompt
    if options.ignore_eos:
        body["ignore_eos"] = True
    slo = {key: value for key, value in (("ttft_ms", options.slo_ttft_ms), ("tpot_ms", options.slo_tpot_ms))
           if value is not None}
    if slo:
        body["slo"] = slo  # for servers that schedule by SLO; the others ignore unknown fields
    return body


@dataclass(slots=True)
class _StreamState:
    """What the chunks of one stream have shown so far (times from sending the request)."""

    ttft_s: float | None = None
    last_content_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    num_content_chunks: int = 0
    num_usage_tokens: int | None = None
    error: str | None = None

    def on_chunk(self, chunk: dict[str, Any], now_s: float) -> None:
        if "error" in chunk:  # an error event inside the stream (e.g. the server aborted the request)
            self.error = _error_text(chunk["error"])
            return
        if usage := chunk.get("usage"):
            self.num_usage_tokens = usage.get("completion_tokens", self.num_usage_tokens)
        if not any(_content(choice) for choice in chunk.get("choices") or []):
            return
        if self.ttft_s is None:
            self.ttft_s = now_s
        else:
            self.itl_s.append(now_s - self.last_content_s)
        self.last_content_s = now_s
        self.num_content_chunks += 1


def _content(choice: dict[str, Any]) -> str:
    """The text a completions choice or a chat delta carries ("" when none)."""
    if "delta" in choice:
        delta = choice.get("delta") or {}
        return delta.get("content") or delta.get("reasoning_content") or ""
    return choice.get("text") or ""


def _error_text(error: Any) -> str:
    text = error.get("message", json.dumps(error)) if isinstance(error, dict) else str(error)
    return text[:MAX_ERROR_CHARS]


async def send_request(client: httpx.AsyncClient, url: str, body: dict[str, Any], prompt_len: int,
                       arrival_time_s: float = 0.0, clock_origin: float = 0.0) -> RequestRecord:
    """POST one streaming request and time it; never raises for HTTP or server errors.

    `clock_origin` is the `time.perf_counter()` value that `arrival_time_s` and the record's
    start time count from (the benchmark's start).
    """
    start = time.perf_counter()
    state = _StreamState()
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                state.error = f"HTTP {response.status_code}: {text[:MAX_ERROR_CHARS]}"
            else:
                await _read_events(response, state, start)
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        state.error = f"{type(e).__name__}: {e}"[:MAX_ERROR_CHARS] or type(e).__name__
    e2el_s = time.perf_counter() - start
    if state.error is None and state.ttft_s is None:
        state.error = "the stream ended without any content"
    output_len = state.num_usage_tokens if state.num_usage_tokens is not None else state.num_content_chunks
    return RequestRecord(prompt_len=prompt_len, output_len=output_len, ttft_s=state.ttft_s, itl_s=state.itl_s,
                         e2el_s=e2el_s, success=state.error is None, error=state.error,
                         arrival_time_s=arrival_time_s, start_time_s=start - clock_origin)


async def _read_events(response: httpx.Response, state: _StreamState, start: float) -> None:
    """Feed every `data:` event of an SSE stream to `state`, up to `[DONE]`."""
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue  # blank separators, comments, `event:` lines
        data = line.removeprefix("data:").strip()
        if data == "[DONE]":
            return
        state.on_chunk(json.loads(data), time.perf_counter() - start)


def new_client(max_concurrency: int | None, fresh_connections: bool, api_key: str | None) -> httpx.AsyncClient:
    """An HTTP client for one run.  `fresh_connections` opens a new connection per request:
    llama-server drops keep-alive connections under load, which would show as failures."""
    limits = httpx.Limits(max_connections=max_concurrency,
                          max_keepalive_connections=0 if fresh_connections else max_concurrency)
    headers = {"Connection": "close"} if fresh_connections else {}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return httpx.AsyncClient(limits=limits, headers=headers, timeout=httpx.Timeout(REQUEST_TIMEOUT_S))
