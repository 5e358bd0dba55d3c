"""OpenAI-compatible request and response schemas as msgspec Structs.

Requests are decoded in two passes: the raw JSON into builtins (to log and drop unknown fields),
then `msgspec.convert` into the Struct, which checks types.  Value ranges are checked once, by
`SamplingParams` and the serving layer, so that every message names the parameter at fault.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Annotated, Any, Literal, TypeVar

import msgspec

from engine.api.errors import APIError

logger = logging.getLogger(__name__)

T = TypeVar("T", bound=msgspec.Struct)


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class StreamOptions(msgspec.Struct):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class SLOField(msgspec.Struct, kw_only=True):
    """Per-request latency targets (this engine's extension; the `slo` policy schedules by them)."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None


class ElasticField(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Which elastic submodel serves the request (this engine's extension; engine/elastic/).
    "auto" leaves a knob to the slo policy, which picks the best quality the request's latency
    targets allow under the load, never below the floors (engine/scheduler/elastic_choice.py)."""

    level: int | Literal["auto"] | None = None
    # The fraction of a long prompt the layers past the prune layer compute (engine/prompt_pruning.py);
    # checked by the engine, so that a bad value is a 400 naming `elastic.prompt_keep`.
    prompt_keep: float | Literal["auto"] | None = None
    min_level: int | None = None  # floors for "auto"
    min_prompt_keep: float | None = None


class SamplingFields(msgspec.Struct, kw_only=True):
    """Fields shared by both generation endpoints (OpenAI's plus vLLM's extras)."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    priority: int = 0
    slo: SLOField | None = None
    elastic: ElasticField | None = None
    vllm_xargs: dict[str, str | int | float | bool] | None = None  # vLLM's per-request extras
    prompt_logprobs: int | None = None  # vLLM's: score the prompt, returned as `prompt_logprobs`


class CompletionRequest(SamplingFields, kw_only=True):
    # str | list[str] | list[int] | list[list[int]]; msgspec unions allow one array type, so the
    # list's items are a union and the serving layer checks that they agree.
    prompt: str | list[str | int | list[int]]
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None


class ContentPart(msgspec.Struct):
    type: Literal["text"]  # the only part the engine reads (images and audio are refused by the decoder)
    text: str


Role = Literal["system", "developer", "user", "assistant"]  # what the chat templates render


class ChatMessage(msgspec.Struct):
    role: Role
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatCompletionRequest(SamplingFields, kw_only=True):
    messages: Annotated[list[ChatMessage], msgspec.Meta(min_length=1)]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True


class TokenizeRequest(msgspec.Struct, kw_only=True):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(msgspec.Struct, kw_only=True):
    model: str | None = None
    tokens: list[int]


# ---- responses ----

class UsageInfo(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    elastic_level: int | None = None  # the submodel that served it (its last step), on an elastic model
    prompt_keep: float | None = None  # the fraction of the prompt pruning kept (1.0: whole)
    # Prompt tokens that ran every layer (fewer than prompt_tokens when prompt pruning dropped some).
    prompt_tokens_computed_in_full: int | None = None


class CompletionLogprobs(msgspec.Struct):
    tokens: list[str] = msgspec.field(default_factory=list)
    token_logprobs: list[float | None] = msgspec.field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = msgspec.field(default_factory=list)
    text_offset: list[int] = msgspec.field(default_factory=list)


class PromptLogprob(msgspec.Struct):
    """vLLM's per-token entry of `prompt_logprobs` (keyed by token id)."""

    logprob: float
    rank: int
    decoded_token: str


# One entry per prompt token, null for the first; vLLM's response shape.
PromptLogprobsBody = list[dict[int, PromptLogprob] | None]


class CompletionChoice(msgspec.Struct):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: PromptLogprobsBody | None = None


class CompletionResponse(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    object: str = "text_completion"


class TopLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChatLogprobs(msgspec.Struct):
    content: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(msgspec.Struct):
    role: str = "assistant"
    content: str | None = None


class ChatChoice(msgspec.Struct):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo | None = None
    object: str = "chat.completion"
    prompt_logprobs: PromptLogprobsBody | None = None


class DeltaMessage(msgspec.Struct, omit_defaults=True):
    role: str | None = None
    content: str | None = None


class ChatStreamChoice(msgspec.Struct):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None
    object: str = "chat.completion.chunk"


class ModelCard(msgspec.Struct):
    id: str
    max_model_len: int
    created: int = msgspec.field(default_factory=lambda: int(time.time()))
    object: str = "model"
    owned_by: str = "elastic-engine"
    root: str | None = None


class ModelList(msgspec.Struct):
    data: list[ModelCard]
    object: str = "list"


class TokenizeResponse(msgspec.Struct):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(msgspec.Struct):
    prompt: str


class ErrorInfo(msgspec.Struct):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(msgspec.Struct):
    error: ErrorInfo


# ---- decoding ----

def decode_request(body: bytes, request_type: type[T]) -> T:
    """JSON body -> `request_type`, or APIError(400) naming the offending field."""
    try:
        raw: Any = msgspec.json.decode(body)
    except msgspec.DecodeError as e:
        raise APIError(f"Request body is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise APIError("Request body must be a JSON object.")
    known = request_type.__struct_fields__
    unknown = [key for key in raw if key not in known]
    if unknown:
        logger.debug("Ignoring unknown fields in %s: %s", request_type.__name__, unknown)
        raw = {key: value for key, value in raw.items() if key in known}
    try:
        return msgspec.convert(raw, request_type)
    except msgspec.ValidationError as e:
        raise APIError(f"Invalid request: {e}", param=_param_of(str(e))) from None


def _param_of(message: str) -> str | None:
    """The field an error is about, dotted into objects: 'Expected `int`, got `str` - at `$.n`'
    -> 'n', '... at `$.elastic.level`' -> 'elastic.level'; 'Object missing required field
    `prompt`' -> 'prompt'."""
    at = re.search(r"at `\$\.([A-Za-z_]+(?:\.[A-Za-z_]+)*)", message)
    if at:
        return at.group(1)
    missing = re.search(r"missing required field `([A-Za-z_]+)`", message)
    return missing.group(1) if missing else None


def encode(obj: msgspec.Struct) -> bytes:
    return msgspec.json.encode(obj)


# Characters JSON leaves raw in strings but many clients take for line ends (Python's splitlines,
# hence httpx's aiter_lines; JavaScript before ES2019), as their UTF-8 bytes and JSON escapes.
# SSE itself ends lines only at CR and LF, which JSON always escapes.  Found by the soak: a model
# that emitted U+2028 cut a client's event in two.  The bytes cannot occur except as these
# characters (C2 and E2 are lead bytes) and only inside strings (msgspec writes the rest in ASCII).
LINE_BREAKING_UTF8 = ((b"\xc2\x85", b"\\u0085"), (b"\xe2\x80\xa8", b"\\u2028"), (b"\xe2\x80\xa9", b"\\u2029"))


def sse_event(obj: msgspec.Struct) -> bytes:
    """One server-sent event: `data: <JSON>` and a blank line, the JSON on a single line for
    every client's line splitter."""
    data = msgspec.json.encode(obj)
    for raw, escaped in LINE_BREAKING_UTF8:
        if raw in data:
            data = data.replace(raw, escaped)
    return b"data: " + data + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
