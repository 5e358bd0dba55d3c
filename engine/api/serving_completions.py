"""POST /v1/completions: one engine request per prompt; choice index = prompt_index * n + sample.

`echo` puts the prompt before the completion in `text`, and with `logprobs` its tokens before the
completion's in `logprobs` (scored through prompt logprobs; the first prompt token has none).
`echo` with `max_tokens: 0` scores the prompt and generates nothing (lm-eval's loglikelihood
requests): the engine always samples a token, so it samples one and the response drops it, as
vLLM does.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

from starlette.responses import Response

from engine.api.async_engine import AsyncEngine, RequestGroup
from engine.api.errors import APIError
from engine.api.protocol import (CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse,
                                 encode, random_id, sse_event)
from engine.api.serving_elastic import requested_floors, requested_level, requested_prompt_keep
from engine.api.serving_common import (LOGPROB_FLOOR, check_model, check_prompt_token_ids,
                                       collect, prompt_logprobs_body, resolve_max_tokens, slo_target,
                                       streaming_response, to_sampling_params, usage_of)
from engine.outputs import CompletionOutput, PromptLogprobs, RequestOutput, SampleLogprobs
from engine.tokenizer.tokenizer import Tokenizer


@dataclass(slots=True)
class Prompt:
    text: str
    token_ids: list[int]


@dataclass(slots=True)
class _ChoiceProgress:
    """What a stream has already sent for one choice."""

    num_chars: int = 0
    num_tokens: int = 0
    text_offset: int = 0
    is_started: bool = False
    is_finished: bool = False


async def create_completion(request: CompletionRequest, engine: AsyncEngine,
                            arrival_time: float | None = None) -> Response:
    check_model(request.model, engine)
    _check_unsupported(request)
    prompts = parse_prompts(request.prompt, engine)
    is_echo_only = request.echo and request.max_tokens == 0
    sub_requests = []
    completion_id = random_id("cmpl")
    for i, prompt in enumerate(prompts):
        max_tokens = resolve_max_tokens(1 if is_echo_only else request.max_tokens, len(prompt.token_ids), engine)
        params = to_sampling_params(request, engine, max_tokens=max_tokens, logprobs=request.logprobs,
                                    logprobs_param="logprobs", prompt_logprobs=_num_prompt_logprobs(request))
        sub_requests.append((f"{completion_id}-{i}", prompt.token_ids, params))
    group = engine.generate(sub_requests, priority=request.priority, slo=slo_target(request),
                            arrival_time=arrival_time, elastic_level=requested_level(request, engine),
                            prompt_keep=requested_prompt_keep(request), floors=requested_floors(request))
    if request.stream:
        try:
            await group.accepted()
        except BaseException:
            group.close()
            raise
        return streaming_response(_stream(request, engine, completion_id, prompts, group, is_echo_only), group)
    outputs = [_without_generation(o) if is_echo_only else o for o in await collect(group)]
    choices = [_choice(request, engine.tokenizer, prompt_index, prompt, output, completion)
               for prompt_index, (prompt, output) in enumerate(zip(prompts, outputs))
               for completion in output.outputs]
    response = CompletionResponse(completion_id, int(time.time()), engine.model_name, choices,
                                  usage_of([len(p.token_ids) for p in prompts], list(outputs)))
    return Response(encode(response), media_type="application/json")


def _check_unsupported(request: CompletionRequest) -> None:
    if request.suffix is not None:
        raise APIError("suffix is not supported.", param="suffix")
    if request.best_of is not None and request.best_of != request.n:
        raise APIError("best_of is not supported (only best_of == n).", param="best_of")
    if request.max_tokens == 0 and not request.echo:
        raise APIError("max_tokens may be 0 only with echo (to score the prompt without generating).",
                       param="max_tokens")


def _num_prompt_logprobs(request: CompletionRequest) -> int | None:
    """vLLM's rule: the request's own prompt_logprobs, else echo's logprobs also cover the prompt."""
    if request.prompt_logprobs is not None:
        return request.prompt_logprobs
    return request.logprobs if request.echo else None


def _without_generation(output: RequestOutput) -> RequestOutput:
    """echo with max_tokens 0: drop the one token the engine sampled; the choice ends at once."""
    return replace(output, outputs=[
        replace(c, text="", token_ids=[], cumulative_logprob=None, logprobs=[] if c.logprobs is not None else None,
                finish_reason="length" if c.finished() else None, stop_reason=None)
        for c in output.outputs])


def _choice(request: CompletionRequest, tokenizer: Tokenizer, prompt_index: int, prompt: Prompt,
            output: RequestOutput, completion: CompletionOutput) -> CompletionChoice:
    text, logprobs = completion.text, None
    if request.logprobs is not None:
        logprobs = _logprobs(completion, 0, len(completion.token_ids), len(prompt.text) if request.echo else 0)
    if request.echo:
        text = prompt.text + text
        if logprobs is not None:
            logprobs = _joined(_prompt_part(prompt, output.prompt_logprobs, request.logprobs, tokenizer), logprobs)
    prompt_logprobs = prompt_logprobs_body(output.prompt_logprobs) if request.prompt_logprobs is not None else None
    return CompletionChoice(prompt_index * request.n + completion.index, text, logprobs, completion.finish_reason,
                            completion.stop_reason, prompt_logprobs)


def parse_prompts(prompt: str | list[str | int | list[int]], engine: AsyncEngine) -> list[Prompt]:
    """A string, a list of strings, a list of token ids, or a list of token-id lists."""
    if isinstance(prompt, str):
        items: list[str] | list[list[int]] = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        items = [prompt]  # type: ignore[list-item]
    elif prompt and (all(isinstance(p, str) for p in prompt) or all(isinstance(p, list) for p in prompt)):
        items = prompt  # type: ignore[assignment]
    else:
        raise APIError("prompt must be a non-empty string, list of strings, list of token ids, or list of "
                       "token-id lists.", param="prompt")
    if len(items) > engine.limits.max_num_prompts:
        raise APIError(f"At most {engine.limits.max_num_prompts} prompts per request.", param="prompt")
    prompts = []
    for item in items:
        if isinstance(item, str):
            prompts.append(Prompt(item, engine.tokenizer.encode(item)))
        else:
            check_prompt_token_ids(item, engine)
            prompts.append(Prompt(engine.tokenizer.decode(item, skip_special_tokens=False), item))
        if not prompts[-1].token_ids:
            raise APIError("The prompt is empty.", param="prompt")
    return prompts


def _logprobs(completion: CompletionOutput, start: int, end: int, text_offset: int) -> CompletionLogprobs:
    """Completions' logprobs for tokens [start, end): token strings, their logprobs, the
    alternatives by string, and each token's character offset in the choice's text."""
    result = CompletionLogprobs()
    entries: SampleLogprobs = completion.logprobs or []
    for token_id, entry in zip(completion.token_ids[start:end], entries[start:end]):
        sampled = entry.get(token_id)
        token = sampled.decoded_token if sampled is not None else ""
        result.tokens.append(token)
        result.token_logprobs.append(_finite(sampled.logprob) if sampled is not None else None)
        result.top_logprobs.append({lp.decoded_token: _finite(lp.logprob)
                                    for lp in sorted(entry.values(), key=lambda lp: lp.rank)})
        result.text_offset.append(text_offset)
        text_offset += len(token)
    return result


def _prompt_part(prompt: Prompt, prompt_logprobs: PromptLogprobs | None, num_top: int,
                 tokenizer: Tokenizer) -> CompletionLogprobs:
    """The prompt's tokens in the legacy logprobs form, offsets from 0: the first token has no
    logprob and no alternatives (nothing before it); each other one its own logprob and its
    position's `num_top` most likely tokens, itself included even when it is not among them."""
    result = CompletionLogprobs()
    entries = prompt_logprobs or [None] * len(prompt.token_ids)
    text_offset = 0
    for token_id, entry in zip(prompt.token_ids, entries):
        token = tokenizer.token_text(token_id)
        scored = entry.get(token_id) if entry is not None else None
        result.tokens.append(token)
        result.token_logprobs.append(_finite(scored.logprob) if scored is not None else None)
        result.top_logprobs.append(None if entry is None else {
            lp.decoded_token: _finite(lp.logprob) for top_id, lp in sorted(entry.items(), key=lambda item: item[1].rank)
            if lp.rank <= num_top or top_id == token_id})
        result.text_offset.append(text_offset)
        text_offset += len(token)
    return result


def _joined(first: CompletionLogprobs, then: CompletionLogprobs) -> CompletionLogprobs:
    return CompletionLogprobs(first.tokens + then.tokens, first.token_logprobs + then.token_logprobs,
                              first.top_logprobs + then.top_logprobs, first.text_offset + then.text_offset)


def _finite(logprob: float) -> float:
    return max(logprob, LOGPROB_FLOOR)


async def _stream(request: CompletionRequest, engine: AsyncEngine, completion_id: str, prompts: list[Prompt],
                  group: RequestGroup, is_echo_only: bool) -> AsyncIterator[bytes]:
    created = int(time.time())
    progress: dict[int, _ChoiceProgress] = {}
    finals: list[RequestOutput | None] = [None] * len(prompts)
    async for prompt_index, output in group:
        output = _without_generation(output) if is_echo_only else output
        finals[prompt_index] = output
        for completion in output.outputs:
            index = prompt_index * request.n + completion.index
            sent = progress.setdefault(index, _ChoiceProgress(
                text_offset=len(prompts[prompt_index].text) if request.echo else 0))
            echoed = _Echo(prompts[prompt_index], output.prompt_logprobs, engine.tokenizer)
            choice = _next_choice(request, echoed, completion, index, sent)
            if choice is not None:
                yield sse_event(CompletionResponse(completion_id, created, engine.model_name, [choice]))
    if request.stream_options is not None and request.stream_options.include_usage:
        usage = usage_of([len(p.token_ids) for p in prompts], finals)
        yield sse_event(CompletionResponse(completion_id, created, engine.model_name, [], usage))


@dataclass(slots=True)
class _Echo:
    """What echo puts before a stream's first chunk of a choice."""

    prompt: Prompt
    prompt_logprobs: PromptLogprobs | None
    tokenizer: Tokenizer


def _next_choice(request: CompletionRequest, echo: _Echo, completion: CompletionOutput, index: int,
                 sent: _ChoiceProgress) -> CompletionChoice | None:
    """The delta of one choice since the last chunk, or None when there is nothing new."""
    if sent.is_finished:
        return None
    delta = completion.text[sent.num_chars:]
    num_tokens = len(completion.token_ids)
    has_new_logprobs = request.logprobs is not None and num_tokens > sent.num_tokens
    if not delta and completion.finish_reason is None and not has_new_logprobs:
        return None
    logprobs = None
    if request.logprobs is not None:
        logprobs = _logprobs(completion, sent.num_tokens, num_tokens, sent.text_offset)
        sent.text_offset += sum(len(token) for token in logprobs.tokens)
        if request.echo and not sent.is_started:
            prompt_part = _prompt_part(echo.prompt, echo.prompt_logprobs, request.logprobs, echo.tokenizer)
            logprobs = _joined(prompt_part, logprobs)
    text = echo.prompt.text + delta if request.echo and not sent.is_started else delta
    sent.num_chars = max(sent.num_chars, len(completion.text))
    sent.num_tokens = num_tokens
    sent.is_started = True
    sent.is_finished = completion.finish_reason is not None
    return CompletionChoice(index, text, logprobs, completion.finish_reason, completion.stop_reason)
