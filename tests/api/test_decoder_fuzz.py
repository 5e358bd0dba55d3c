"""Arbitrary bytes and arbitrary JSON at the request decoders and the translation to engine
parameters (hypothesis): every input is either accepted or refused with an APIError (a 4xx that
the server renders as OpenAI's error body); nothing else ever escapes, whatever the values."""

from __future__ import annotations

import json
from types import SimpleNamespace

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.api.errors import APIError
from engine.api.limits import RequestLimits
from engine.api.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest,
                                 decode_request)
from engine.api.serving_common import resolve_max_tokens, slo_target, to_sampling_params

ENGINE = SimpleNamespace(tokenizer=SimpleNamespace(vocab_size=100), max_model_len=64, model_name="m",
                         limits=RequestLimits())
REQUEST_TYPES = (CompletionRequest, ChatCompletionRequest, TokenizeRequest, DetokenizeRequest)
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70)
    | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=20)

# Bodies shaped like real requests: the real field names, each with any JSON value.
FIELDS = sorted({*CompletionRequest.__struct_fields__, *ChatCompletionRequest.__struct_fields__})
field_bodies = st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=10)
# Messages and nested objects with the right keys but any values.
messages = st.lists(st.dictionaries(st.sampled_from(["role", "content", "name", "type", "text"]), json_values,
                                    max_size=4), max_size=3)
elastic = st.dictionaries(st.sampled_from(["level", "prompt_keep", "min_level", "min_prompt_keep", "other"]),
                          json_values, max_size=4)


def translate(body: bytes, request_type: type) -> None:
    """What a route does before the engine: decode, then map to SamplingParams; only APIError may escape."""
    try:
        request = decode_request(body, request_type)
        if request_type in (CompletionRequest, ChatCompletionRequest):
            logprobs = request.logprobs if request_type is CompletionRequest else request.top_logprobs
            max_tokens = resolve_max_tokens(request.max_tokens, 4, ENGINE)
            slo_target(request)
            to_sampling_params(request, ENGINE, max_tokens=max_tokens, logprobs=logprobs,
                               logprobs_param="logprobs", prompt_logprobs=request.prompt_logprobs)
    except APIError as error:
        assert 400 <= error.status < 500 and error.message


@FUZZ
@given(st.binary(max_size=200), st.sampled_from(REQUEST_TYPES))
def test_arbitrary_bytes(body: bytes, request_type: type) -> None:
    translate(body, request_type)


@FUZZ
@given(json_values, st.sampled_from(REQUEST_TYPES))
def test_arbitrary_json(value, request_type: type) -> None:
    translate(json.dumps(value).encode(), request_type)


@FUZZ
@given(field_bodies, messages, elastic, st.sampled_from(REQUEST_TYPES))
def test_real_fields_with_arbitrary_values(body: dict, chat: list, elastic_value: dict, request_type: type) -> None:
    body = {**body, "messages": chat, "elastic": elastic_value}
    translate(msgspec.json.encode(body), request_type)
