"""The server's OpenAPI document (`/openapi.json`, `/docs`): FastAPI's paths, with the request and
response bodies the routes really take and give.

The routes read their bodies themselves (msgspec decodes faster than FastAPI's pydantic models
and names the offending field), so FastAPI cannot see their schemas; `install_openapi` adds them,
generated from the msgspec Structs in protocol.py, with every error status the server can answer
and OpenAI's error body.  schemathesis checks a live server against this document
(tests/api/test_openapi_fuzz.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from engine.api.protocol import (ChatCompletionRequest, ChatCompletionResponse, CompletionRequest, CompletionResponse,
                                 DetokenizeRequest, DetokenizeResponse, ErrorResponse, ModelList, TokenizeRequest,
                                 TokenizeResponse)

REF_TEMPLATE = "#/components/schemas/{name}"


class VersionResponse(msgspec.Struct):
    version: str


@dataclass(frozen=True)
class Operation:
    request: type | None  # the JSON body's Struct, None for a GET
    response: type | None  # the 200 JSON body's Struct, None for no JSON body
    streams: bool = False  # 200 may also be text/event-stream (stream: true)
    errors: tuple[int, ...] = (400, 401, 404, 408, 413, 429, 500, 503)
    other_media: str | None = None  # a non-JSON 200 body (Prometheus text)


OPERATIONS: dict[tuple[str, str], Operation] = {
    ("/v1/completions", "post"): Operation(CompletionRequest, CompletionResponse, streams=True),
    ("/v1/chat/completions", "post"): Operation(ChatCompletionRequest, ChatCompletionResponse, streams=True),
    ("/v1/models", "get"): Operation(None, ModelList, errors=(401,)),
    ("/tokenize", "post"): Operation(TokenizeRequest, TokenizeResponse, errors=(400, 404, 413)),
    ("/detokenize", "post"): Operation(DetokenizeRequest, DetokenizeResponse, errors=(400, 404, 413)),
    ("/version", "get"): Operation(None, VersionResponse, errors=()),
    ("/health", "get"): Operation(None, None, errors=(503,)),
    ("/metrics", "get"): Operation(None, None, errors=(), other_media="text/plain"),
}


def install_openapi(app: FastAPI) -> None:
    """Replace app.openapi with the document described above (built once, on first request)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_document(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def build_document(app: FastAPI) -> dict[str, Any]:
    document = get_openapi(title=app.title, version=app.version, routes=app.routes,
                           description="OpenAI-compatible API of Elastic Engine")
    structs = [s for op in OPERATIONS.values() for s in (op.request, op.response) if s is not None]
    _, components = msgspec.json.schema_components([*structs, ErrorResponse], ref_template=REF_TEMPLATE)
    document.setdefault("components", {}).setdefault("schemas", {}).update(components)
    for (path, method), operation in OPERATIONS.items():
        entry = document["paths"].get(path, {}).get(method)
        if entry is None:
            raise RuntimeError(f"the OpenAPI description names {method.upper()} {path}, which the app lacks")
        _describe(entry, operation)
    return document


def _ref(struct: type) -> dict[str, str]:
    return {"$ref": REF_TEMPLATE.format(name=struct.__name__)}


def _describe(entry: dict[str, Any], operation: Operation) -> None:
    if operation.request is not None:
        entry["requestBody"] = {"required": True, "content": {"application/json": {"schema": _ref(operation.request)}}}
    ok: dict[str, Any] = {"description": "Success"}
    content: dict[str, Any] = {}
    if operation.response is not None:
        content["application/json"] = {"schema": _ref(operation.response)}
    if operation.streams:
        # Each event, as SSE parsers see it: `data` is a chunk's JSON (or an error body), and the
        # last is the text [DONE].
        event = {"type": "object", "required": ["data"],
                 "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
                 "description": "server-sent events, ending with `data: [DONE]`"}
        content["text/event-stream"] = {"schema": event}
    if operation.other_media is not None:
        content[operation.other_media] = {"schema": {"type": "string"}}
    if content:
        ok["content"] = content
    error_body = {"application/json": {"schema": _ref(ErrorResponse)}}
    entry["responses"] = {"200": ok, **{str(status): {"description": _ERROR_TEXT[status], "content": error_body}
                                        for status in operation.errors}}
    if operation.errors == (503,) and operation.response is None:  # /health: 503 has no body
        entry["responses"]["503"] = {"description": _ERROR_TEXT[503]}


_ERROR_TEXT = {400: "Invalid request (the error names the field)", 401: "Missing or invalid API key",
               404: "Unknown model", 408: "The request timed out (--request-timeout)",
               413: "Request body too large", 429: "Busy: too many waiting requests, or an SLO out of reach",
               500: "This request failed (the engine goes on)", 503: "Shutting down, or not ready"}
