"""Validation and translation shared by the completion and chat endpoints: OpenAI fields ->
`SamplingParams`, prompt checks against the vocabulary and context window, usage, SSE."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator, Awaitable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from engine.api.async_engine import AsyncEngine, RequestGroup
from engine.api.errors import APIError
from engine.api.protocol import (ErrorInfo, ErrorResponse, PromptLogprob, PromptLogprobsBody, SamplingFields,
                                 UsageInfo, sse_event)
from engine.api.serving_elastic import alias_level
from engine.outputs import PromptLogprobs, RequestOutput
from engine.request import SLOTarget
from engine.sampling_params import SamplingParams, SamplingParamsError

logger = logging.getLogger(__name__)

MAX_LOGIT_BIAS = 300  # entries; OpenAI's limit is 300
LOGPROB_FLOOR = -9999.0  # JSON has no -inf; OpenAI reports this for impossible tokens


def check_model(requested: str | None, engine: AsyncEngine) -> None:
    """The served model's name or one of its elastic aliases (`name@level`), else a 404-style 400."""
    alias_level(requested, engine)


def check_prompt_token_ids(token_ids: list[int], engine: AsyncEngine, param: str = "prompt") -> None:
    if not token_ids:
        raise APIError("The prompt is empty.", param=param)
    vocab_size = engine.tokenizer.vocab_size
    bad = next((t for t in token_ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise APIError(f"Token id {bad} is outside the vocabulary [0, {vocab_size}).", param=param)


def resolve_max_tokens(requested: int | None, num_prompt_tokens: int, engine: AsyncEngine,
                       param: str = "max_tokens") -> int:
    """max_tokens, or all of the context window the prompt leaves (vLLM's default)."""
    room = engine.max_model_len - num_prompt_tokens
    if requested is not None and requested < 1:
        raise APIError(f"{param} must be at least 1, got {requested}.", param=param)
    if room < 1 or (requested is not None and requested > room):
        asked = f"{requested} tokens for the completion" if requested is not None else "at least 1 token"
        raise APIError(f"This model's maximum context length is {engine.max_model_len} tokens. However, "
                       f"you requested {num_prompt_tokens} tokens in the prompt and {asked}. Please reduce "
                       f"the length of the prompt or the completion.", param=param, code="context_length_exceeded")
    return requested if requested is not None else room


def slo_target(request: SamplingFields) -> SLOTarget | None:
    """The request's `slo` field in seconds; 400 for a target that is not a positive number."""
    if request.slo is None:
        return None
    for name in ("ttft_ms", "tpot_ms"):
        value = getattr(request.slo, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise APIError(f"slo.{name} must be a positive number of milliseconds, got {value}.", param=f"slo.{name}")
    return SLOTarget.resolve(None, request.slo.ttft_ms, request.slo.tpot_ms)


def to_sampling_params(request: SamplingFields, engine: AsyncEngine, *, max_tokens: int,
                       logprobs: int | None, logprobs_param: str,
                       prompt_logprobs: int | None = None) -> SamplingParams:
    """OpenAI + vLLM fields -> SamplingParams; range errors become 400 naming the field.
    `prompt_logprobs`: the request's own, or what the endpoint derives (echo with logprobs)."""
    limits = engine.limits
    if not 1 <= request.n <= limits.max_n:
        raise APIError(f"n must be in [1, {limits.max_n}], got {request.n}.", param="n")
    for name, value in ((logprobs_param, logprobs), ("prompt_logprobs", prompt_logprobs)):
        if value is not None and value > limits.max_logprobs:
            raise APIError(f"{name} must be at most {limits.max_logprobs}, got {value}.", param=name)
    if request.prompt_logprobs is not None and request.stream:
        raise APIError("prompt_logprobs are not available when stream is true.", param="prompt_logprobs")
    stop = [request.stop] if isinstance(request.stop, str) else request.stop
    if stop is not None and len(stop) > limits.max_stop_strings:
        raise APIError(f"At most {limits.max_stop_strings} stop strings are allowed.", param="stop")
    if stop is not None and any(len(s) > limits.max_stop_string_chars for s in stop):
        raise APIError(f"Each stop string may be at most {limits.max_stop_string_chars} characters.", param="stop")
    for name, value in (("temperature", request.temperature), ("top_p", request.top_p),
                        ("presence_penalty", request.presence_penalty),
                        ("frequency_penalty", request.frequency_penalty), ("min_p", request.min_p),
                        ("repetition_penalty", request.repetition_penalty)):
        if value is not None and not math.isfinite(value):
            raise APIError(f"{name} must be a finite number.", param=name)
    if request.seed is not None and not -(2**63) <= request.seed < 2**63:
        raise APIError(f"seed must be a 64-bit signed integer, got {request.seed}.", param="seed")
    if request.stop_token_ids is not None:
        check_prompt_token_ids(request.stop_token_ids or [0], engine, param="stop_token_ids")
    optional = {name: value for name, value in (
        ("temperature", request.temperature), ("top_p", request.top_p), ("top_k", request.top_k),
        ("min_p", request.min_p), ("repetition_penalty", request.repetition_penalty)) if value is not None}
    try:
        return SamplingParams(
            n=request.n, seed=request.seed, presence_penalty=request.presence_penalty,
            frequency_penalty=request.frequency_penalty, logit_bias=_logit_bias(request.logit_bias, engine),
            stop=stop, stop_token_ids=request.stop_token_ids, ignore_eos=request.ignore_eos,
            max_tokens=max_tokens, min_tokens=request.min_tokens, logprobs=logprobs,
            prompt_logprobs=prompt_logprobs, skip_special_tokens=request.skip_special_tokens,
            include_stop_str_in_output=request.include_stop_str_in_output, **optional)
    except SamplingParamsError as e:
        param = logprobs_param if e.param == "logprobs" else e.param
        raise APIError(str(e), param=param) from None


def _logit_bias(logit_bias: dict[str, float] | None, engine: AsyncEngine) -> dict[int, float] | None:
    if not logit_bias:
        return None
    if len(logit_bias) > MAX_LOGIT_BIAS:
        raise APIError(f"logit_bias may hold at most {MAX_LOGIT_BIAS} entries.", param="logit_bias")
    vocab_size = engine.tokenizer.vocab_size
    result: dict[int, float] = {}
    for key, bias in logit_bias.items():
        try:
            token_id = int(key)
        except ValueError:
            raise APIError(f"logit_bias keys must be token ids, got {key!r}.", param="logit_bias") from None
        if not 0 <= token_id < vocab_size:
            raise APIError(f"logit_bias token id {token_id} is outside the vocabulary [0, {vocab_size}).",
                           param="logit_bias")
        if not -100.0 <= bias <= 100.0:
            raise APIError(f"logit_bias values must be in [-100, 100], got {bias}.", param="logit_bias")
        result[token_id] = bias
    return result


def prompt_logprobs_body(prompt_logprobs: PromptLogprobs | None) -> PromptLogprobsBody | None:
    """The engine's prompt logprobs in vLLM's response shape, -inf floored as JSON needs."""
    if prompt_logprobs is None:
        return None
    return [None if entry is None else
            {token_id: PromptLogprob(max(lp.logprob, LOGPROB_FLOOR), lp.rank, lp.decoded_token)
             for token_id, lp in entry.items()}
            for entry in prompt_logprobs]


def usage_of(prompt_lengths: list[int], outputs: list[RequestOutput | None]) -> UsageInfo:
    """Each prompt counts once, whatever its n; each sample's generated tokens count."""
    completion_tokens = sum(len(c.token_ids) for o in outputs if o is not None for c in o.outputs)
    prompt_tokens = sum(prompt_lengths)
    level = next((o.elastic_level for o in outputs if o is not None), None)
    keep = next((o.prompt_keep for o in outputs if o is not None), None)
    # One output per prompt (its samples share the prompt and its pruning).
    in_full = sum(length if o is None or o.num_prompt_tokens_computed_in_full is None
                  else o.num_prompt_tokens_computed_in_full for length, o in zip(prompt_lengths, outputs))
    return UsageInfo(prompt_tokens, completion_tokens, prompt_tokens + completion_tokens, level, keep, in_full)


async def collect(group: RequestGroup) -> list[RequestOutput]:
    """Run every sub-request to its end; the final (cumulative) output of each, by index."""
    finals: list[RequestOutput | None] = [None] * len(group.request_ids)
    try:
        async for index, output in group:
            finals[index] = output
    finally:
        group.close()
    return [output for output in finals if output is not None]


def streaming_response(events: AsyncIterator[bytes], group: RequestGroup) -> StreamingResponse:
    """SSE around `events`; an engine error mid-stream becomes an error event; [DONE] ends it."""

    async def body() -> AsyncIterator[bytes]:
        try:
            async for event in events:
                yield event
        except APIError as e:
            yield sse_event(ErrorResponse(ErrorInfo(e.message, e.type, e.param, e.code)))
        except Exception as e:  # a bug; the headers are sent, so report it in the stream
            logger.exception("Streaming response failed")
            # No message text: it may hold paths or internals (the log has the traceback).
            yield sse_event(ErrorResponse(ErrorInfo(f"Internal server error: {type(e).__name__}", "server_error")))
        finally:
            group.close()  # the client went away (cancellation) or the stream ended: free the KV
        yield b"data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def run_until_disconnected(request: Request, work: Awaitable[Response]) -> Response:
    """Await `work`, cancelling it if the client disconnects first (its `finally` aborts the
    engine request).  The body must already be read, so `receive()` can only say disconnect."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait([task, watcher], return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return Response(status_code=499)  # nobody is listening
    return task.result()


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message: dict[str, Any] = await request.receive()
        if message["type"] == "http.disconnect":
            return
