"""Request decoding and validation without a server: bodies -> Structs -> SamplingParams, error bodies."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import msgspec
import pytest

from engine.api.errors import APIError
from engine.api.limits import RequestLimits
from engine.api.protocol import (ChatCompletionRequest, CompletionRequest, ErrorInfo, ErrorResponse, UsageInfo,
                                 CompletionResponse, decode_request, sse_event)
from engine.api.serving_common import resolve_max_tokens, to_sampling_params

ENGINE = SimpleNamespace(tokenizer=SimpleNamespace(vocab_size=100), max_model_len=64, model_name="m",
                         limits=RequestLimits())


def decode(body: bytes, request_type: type = CompletionRequest):
    return decode_request(body, request_type)


def test_decode_defaults_and_unknown_fields(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="engine.api.protocol"):
        request = decode(b'{"prompt": "hi", "n": 2, "best_of_luck": 1, "top_k": 5}')
    assert request.prompt == "hi" and request.n == 2 and request.top_k == 5 and request.max_tokens is None
    assert "best_of_luck" in caplog.text


@pytest.mark.parametrize(("body", "param"), [
    (b"{", None), (b"[]", None), (b'{"prompt": 1.5}', "prompt"), (b'{"prompt": "x", "n": "2"}', "n"),
    (b'{"prompt": "x", "stop": 3}', "stop"), (b"{}", "prompt"), (b'{"prompt": "x", "max_tokens": true}', "max_tokens"),
])
def test_decode_errors_name_the_field(body: bytes, param: str | None) -> None:
    with pytest.raises(APIError) as info:
        decode(body)
    assert info.value.status == 400 and info.value.param == param


def test_chat_message_shapes() -> None:
    request = decode(b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]},'
                     b'{"role": "assistant", "content": null}]}', ChatCompletionRequest)
    assert request.messages[0].content[0].text == "a" and request.messages[1].content is None
    with pytest.raises(APIError) as info:
        decode(b'{"messages": [{"content": "x"}]}', ChatCompletionRequest)
    assert info.value.param == "messages"


def test_sampling_params_mapping() -> None:
    request = decode(b'{"prompt": "x", "temperature": 0, "top_p": 0.5, "top_k": -1, "stop": "\\n", "seed": 7,'
                     b' "logit_bias": {"5": -100}, "min_tokens": 2, "stop_token_ids": [3]}')
    params = to_sampling_params(request, ENGINE, max_tokens=10, logprobs=2, logprobs_param="logprobs")
    assert (params.temperature, params.top_p, params.top_k, params.seed) == (0.0, 0.5, 0, 7)
    assert params.stop_strings == ["\n"] and params.logit_bias == {5: -100.0}
    assert (params.max_tokens, params.min_tokens, params.logprobs, params.stop_token_ids) == (10, 2, 2, [3])


@pytest.mark.parametrize(("body", "param"), [
    (b'{"prompt": "x", "temperature": -0.5}', "temperature"), (b'{"prompt": "x", "top_p": 0}', "top_p"),
    (b'{"prompt": "x", "n": 0}', "n"), (b'{"prompt": "x", "n": 1000}', "n"),
    (b'{"prompt": "x", "logit_bias": {"100": 1}}', "logit_bias"), (b'{"prompt": "x", "logit_bias": {"1": 101}}',
                                                                   "logit_bias"),
    (b'{"prompt": "x", "stop_token_ids": [100]}', "stop_token_ids"), (b'{"prompt": "x", "min_p": 2}', "min_p"),
    (b'{"prompt": "x", "min_tokens": 20}', "min_tokens"), (b'{"prompt": "x", "seed": 9223372036854775808}', "seed"),
])
def test_sampling_param_errors(body: bytes, param: str) -> None:
    with pytest.raises(APIError) as info:
        to_sampling_params(decode(body), ENGINE, max_tokens=10, logprobs=None, logprobs_param="logprobs")
    assert info.value.param == param


def test_logprobs_error_names_the_endpoint_field() -> None:
    request = decode(b'{"messages": [{"role": "user", "content": "x"}]}', ChatCompletionRequest)
    with pytest.raises(APIError) as info:
        to_sampling_params(request, ENGINE, max_tokens=10, logprobs=99, logprobs_param="top_logprobs")
    assert info.value.param == "top_logprobs"


def test_max_tokens_defaults_to_the_rest_of_the_context() -> None:
    assert resolve_max_tokens(None, 10, ENGINE) == 54
    assert resolve_max_tokens(54, 10, ENGINE) == 54
    for requested, num_prompt_tokens in ((55, 10), (None, 64), (0, 10)):
        with pytest.raises(APIError) as info:
            resolve_max_tokens(requested, num_prompt_tokens, ENGINE)
        assert info.value.param == "max_tokens"


def test_encodings() -> None:
    body = msgspec.json.decode(msgspec.json.encode(ErrorResponse(ErrorInfo("bad", "invalid_request_error", "n"))))
    assert body == {"error": {"message": "bad", "type": "invalid_request_error", "param": "n", "code": None}}
    event = sse_event(CompletionResponse("id", 1, "m", [], UsageInfo(1, 2, 3)))
    assert event.startswith(b"data: {") and event.endswith(b"}\n\n")
    assert msgspec.json.decode(event[len(b"data: "):])["usage"]["total_tokens"] == 3


def test_sse_event_stays_one_line_for_every_line_splitter() -> None:
    """U+0085, U+2028 and U+2029 are legal raw in JSON strings, but Python's splitlines (httpx's
    aiter_lines) ends lines there: the event escapes them, and decodes to the same text."""
    text = "one\u2028two\x85three\u2029four\u00e9\u20ac\U0001f600 \u2027\u202a"
    event = sse_event(ErrorResponse(ErrorInfo(text, "server_error")))
    assert event.decode().splitlines() == [event.decode()[:-2], ""]  # one data line, then the blank one
    assert event.startswith(b"data: ") and event.endswith(b"\n\n")
    assert msgspec.json.decode(event[6:-2])["error"]["message"] == text
