"""The router deployment: OpenAI HTTP in, each request to one engine replica, its response out.

It reads a request only as far as routing needs (the prompt, or the chat messages' text, for
Ray's PrefixCacheAffinityRouter) and passes the HTTP request through whole: validation, errors
and streams are the replica's own `engine serve` app's.  /metrics merges every replica's.

A replica that dies mid-request: before its response started, the client gets a 503 with
OpenAI's error body; mid-stream, an error event and `[DONE]`.  Ray Serve restarts the replica.
A client that goes away cancels the replica's call, whose app then aborts the request.
"""


import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import ray
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from ray import serve
from ray.serve.handle import DeploymentHandle

from engine.api.errors import APIError
from engine.api.protocol import ErrorInfo, ErrorResponse, sse_event
from engine.api.server import error_response
from engine.replicas.asgi_bridge import HTTPRequest, Message
from engine.replicas.metrics_board import merged_exposition, metrics_board
from engine.replicas.replica import RoutedRequest

logger = logging.getLogger(__name__)

app = FastAPI(title="Elastic Engine router")
# A dead or unreachable replica: Ray's errors for it (any RayError under the call).
REPLICA_GONE = (ray.exceptions.RayError,)
REPLICAS_STARTUP_TIMEOUT_S = 600.0  # engines load (and may build an elastic checkpoint) first
REPLICA_POLL_S = 0.2


# Helpers come before the class: serve.ingress captures the module's names as they are when it runs.
async def _rest(first: Message, responses: Any) -> AsyncIterator[bytes]:
    yield first.get("body", b"")
    try:
        async for message in responses:
            yield message.get("body", b"")
    except REPLICA_GONE as error:
        logger.warning("replica failed mid-stream: %s", error)
        yield sse_event(ErrorResponse(ErrorInfo("The engine replica serving this request failed mid-stream.",
                                                "server_error", None, "replica_failed")))
        yield b"data: [DONE]\n\n"
    finally:
        responses.cancel()  # the client went away: the replica's app aborts the request


async def reach_every_replica(engines: DeploymentHandle, expected: int,
                              timeout_s: float = REPLICAS_STARTUP_TIMEOUT_S) -> None:
    """Return once calls through this handle have reached `expected` distinct replicas (or after
    `timeout_s`, with a warning).  A handle learns of replicas from Serve's controller some time
    after they start; until it knows them all, it sends everything to those it knows: requests
    sent at once on start-up went 32 to one replica and 0 to the other (benchmarks/README.md)."""
    seen: set[str] = set()
    deadline = time.monotonic() + timeout_s
    while len(seen) < expected and time.monotonic() < deadline:
        seen.add(await engines.replica_name.remote())
        await asyncio.sleep(0 if len(seen) == expected else REPLICA_POLL_S)
    if len(seen) < expected:
        logger.warning("the router reached %d of %d engine replicas within %.0f s; serving with those",
                       len(seen), expected, timeout_s)


def routing_text(body: bytes) -> str:
    """The text whose prefix routes a request: its prompt, or its chat messages' contents."""
    try:
        request = json.loads(body) if body else {}
    except ValueError:
        return ""  # the replica answers the 400
    if not isinstance(request, dict):
        return ""
    prompt = request.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        return prompt[0]
    messages = request.get("messages")
    if isinstance(messages, list):
        return "".join(_text_of(m.get("content")) for m in messages if isinstance(m, dict))
    return ""


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return ""


@serve.ingress(app)
class Router:
    async def __init__(self, engines: DeploymentHandle, expected_replicas: int = 1) -> None:
        self.engines = engines.options(stream=True)
        self.board = metrics_board()
        await reach_every_replica(self.engines.options(stream=False), expected_replicas)

    @app.get("/metrics")
    async def metrics(self) -> Response:
        return Response(merged_exposition(await self.board.current.remote()), media_type=CONTENT_TYPE_LATEST)

    @app.api_route("/{path:path}", methods=["GET", "POST"])
    async def forward(self, request: Request) -> Response:
        body = await request.body()
        http = HTTPRequest(request.method, request.url.path, request.url.query.encode(),
                           tuple(request.headers.raw), body)
        # Never empty: Ray's router divides by its length.  Other endpoints route by their path.
        text = routing_text(body) or f"{request.method} {request.url.path}"
        responses = self.engines.remote(RoutedRequest(http, text))
        try:
            start = await responses.__anext__()
            first = await responses.__anext__()
        except REPLICA_GONE as error:
            responses.cancel()
            logger.warning("replica failed before responding: %s", error)
            return error_response(APIError("The engine replica serving this request failed; retry it.",
                                           status=503, code="replica_failed"))
        headers = {k.decode(): v.decode() for k, v in start["headers"] if k.lower() != b"content-length"}
        if not first.get("more_body", False):
            return Response(first.get("body", b""), status_code=start["status"], headers=headers)
        return StreamingResponse(_rest(first, responses), status_code=start["status"], headers=headers)
