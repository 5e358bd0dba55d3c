"""POST /v1/chat/completions: messages -> chat template -> one engine request with n samples."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import get_args

from starlette.responses import Response

from engine.api.async_engine import AsyncEngine, RequestGroup
from engine.api.errors import APIError
from engine.api.protocol import (ChatChoice, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse,
                                 ChatLogprobs, ChatMessage, ChatResponseMessage, ChatStreamChoice,
                                 ChatTokenLogprob, DeltaMessage, Role, TopLogprob, encode, random_id,
                                 sse_event)
from engine.api.serving_elastic import requested_floors, requested_level, requested_prompt_keep
from engine.api.serving_common import (LOGPROB_FLOOR, check_model, collect, prompt_logprobs_body,
                                       resolve_max_tokens, slo_target, streaming_response, to_sampling_params,
                                       usage_of)
from engine.outputs import CompletionOutput, Logprob

ROLES = get_args(Role)


@dataclass(slots=True)
class _ChoiceProgress:
    num_chars: int = 0
    num_tokens: int = 0
    is_finished: bool = False


async def create_chat_completion(request: ChatCompletionRequest, engine: AsyncEngine,
                                 arrival_time: float | None = None) -> Response:
    check_model(request.model, engine)
    prompt_token_ids = chat_prompt_token_ids(request.messages, engine, request.add_generation_prompt)
    if request.top_logprobs is not None and not request.logprobs:
        raise APIError("top_logprobs requires logprobs to be true.", param="top_logprobs")
    requested = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
    param = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
    max_tokens = resolve_max_tokens(requested, len(prompt_token_ids), engine, param)
    logprobs = (request.top_logprobs or 0) if request.logprobs else None
    params = to_sampling_params(request, engine, max_tokens=max_tokens, logprobs=logprobs,
                                logprobs_param="top_logprobs", prompt_logprobs=request.prompt_logprobs)
    chat_id = random_id("chatcmpl")
    group = engine.generate([(chat_id, prompt_token_ids, params)], priority=request.priority, slo=slo_target(request),
                            arrival_time=arrival_time, elastic_level=requested_level(request, engine),
                            prompt_keep=requested_prompt_keep(request), floors=requested_floors(request))
    if request.stream:
        try:
            await group.accepted()
        except BaseException:
            group.close()
            raise
        return streaming_response(_stream(request, engine, chat_id, len(prompt_token_ids), group), group)
    [output] = await collect(group)
    choices = [ChatChoice(c.index, ChatResponseMessage(content=c.text),
                          _logprobs(c, 0, len(c.token_ids), request.top_logprobs or 0) if request.logprobs else None,
                          c.finish_reason, c.stop_reason)
               for c in output.outputs]
    response = ChatCompletionResponse(chat_id, int(time.time()), engine.model_name, choices,
                                      usage_of([len(prompt_token_ids)], [output]),
                                      prompt_logprobs=prompt_logprobs_body(output.prompt_logprobs))
    return Response(encode(response), media_type="application/json")


def chat_prompt_token_ids(messages: list[ChatMessage], engine: AsyncEngine, add_generation_prompt: bool) -> list[int]:
    """Validate the conversation, render the model's chat template, tokenize."""
    if not messages:
        raise APIError("messages must not be empty.", param="messages")
    conversation = [{"role": "system" if m.role == "developer" else m.role, "content": _text_of(m, i)}
                    for i, m in enumerate(messages)]
    try:
        text = engine.tokenizer.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt)
    except ValueError as e:  # the template refused these messages (e.g. roles out of order)
        raise APIError(f"The chat template cannot render these messages: {e}", param="messages") from None
    # The template writes the special tokens (BOS, role markers) itself.
    token_ids = engine.tokenizer.encode(text, add_special_tokens=False)
    if not token_ids:
        raise APIError("The rendered conversation is empty.", param="messages")
    return token_ids


def _text_of(message: ChatMessage, index: int) -> str:
    if message.role not in ROLES:
        raise APIError(f"messages[{index}].role must be one of {ROLES}, got {message.role!r}.", param="messages")
    if message.content is None:
        if message.role == "assistant":
            return ""
        raise APIError(f"messages[{index}].content is missing.", param="messages")
    if isinstance(message.content, str):
        return message.content
    texts = []
    for part in message.content:
        if part.type != "text" or part.text is None:
            raise APIError(f"messages[{index}]: only text content parts are supported, got {part.type!r}.",
                           param="messages")
        texts.append(part.text)
    return "\n".join(texts)


def _logprobs(completion: CompletionOutput, start: int, end: int, num_top: int) -> ChatLogprobs:
    content = []
    entries = completion.logprobs or []
    for token_id, entry in zip(completion.token_ids[start:end], entries[start:end]):
        sampled = entry.get(token_id)
        ranked = sorted(entry.values(), key=lambda lp: lp.rank)
        top = [_top(lp) for lp in ranked if lp.rank <= num_top][:num_top]
        if sampled is None:
            content.append(ChatTokenLogprob("", LOGPROB_FLOOR, [], top))
        else:
            head = _top(sampled)
            content.append(ChatTokenLogprob(head.token, head.logprob, head.bytes, top))
    return ChatLogprobs(content)


def _top(logprob: Logprob) -> TopLogprob:
    return TopLogprob(logprob.decoded_token, max(logprob.logprob, LOGPROB_FLOOR),
                      list(logprob.decoded_token.encode("utf-8")))


async def _stream(request: ChatCompletionRequest, engine: AsyncEngine, chat_id: str, num_prompt_tokens: int,
                  group: RequestGroup) -> AsyncIterator[bytes]:
    created = int(time.time())
    model = engine.model_name

    def chunk(choices: list[ChatStreamChoice]) -> bytes:
        return sse_event(ChatCompletionChunk(chat_id, created, model, choices))

    # One choice per chunk, as OpenAI and vLLM send them; each opens with the role and empty content.
    for index in range(request.n):
        yield chunk([ChatStreamChoice(index, DeltaMessage(role="assistant", content=""))])
    progress = [_ChoiceProgress() for _ in range(request.n)]
    final = None
    async for _, output in group:
        final = output
        for completion in output.outputs:
            choice = _next_choice(request, completion, progress[completion.index])
            if choice is not None:
                yield chunk([choice])
    if request.stream_options is not None and request.stream_options.include_usage:
        yield sse_event(ChatCompletionChunk(chat_id, created, model, [], usage_of([num_prompt_tokens], [final])))


def _next_choice(request: ChatCompletionRequest, completion: CompletionOutput,
                 sent: _ChoiceProgress) -> ChatStreamChoice | None:
    if sent.is_finished:
        return None
    delta = completion.text[sent.num_chars:]
    num_tokens = len(completion.token_ids)
    has_new_logprobs = request.logprobs and num_tokens > sent.num_tokens
    if not delta and completion.finish_reason is None and not has_new_logprobs:
        return None
    logprobs = (_logprobs(completion, sent.num_tokens, num_tokens, request.top_logprobs or 0)
                if request.logprobs else None)
    sent.num_chars = max(sent.num_chars, len(completion.text))
    sent.num_tokens = num_tokens
    sent.is_finished = completion.finish_reason is not None
    return ChatStreamChoice(completion.index, DeltaMessage(content=delta) if delta else DeltaMessage(),
                            logprobs, completion.finish_reason)
