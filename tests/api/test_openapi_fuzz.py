"""schemathesis against a live server on loopback, driven by the server's own OpenAPI document:
for every operation, generated bodies (valid and invalid by the schema) never get a 5xx, and
every response (status, content type, body) is one the document allows.  Small caps keep the
valid requests that reach the model short."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import (content_type_conformance, not_a_server_error, response_schema_conformance,
                                 status_code_conformance)

from .conftest import MODEL_NAME, ServerProcess, running_server

MAX_EXAMPLES = 30
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def fuzz_server() -> Iterator[ServerProcess]:
    yield from running_server("--max-model-len", "96", "--max-n", "2", "--max-num-prompts", "2",
                              "--request-timeout", "20", "--max-logprobs", "3")


@pytest.fixture(scope="module")
def api_schema(fuzz_server: ServerProcess):
    return schemathesis.openapi.from_url(f"{fuzz_server.base_url}/openapi.json")


OPERATIONS = [("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models"),
              ("POST", "/tokenize"), ("POST", "/detokenize"), ("GET", "/health"), ("GET", "/metrics"),
              ("GET", "/version")]


def test_the_document_describes_every_route(api_schema) -> None:
    operations = {(op.ok().method.upper(), op.ok().path) for op in api_schema.get_all_operations()}
    assert set(OPERATIONS) <= operations


VOCAB_SIZE = 49152  # SmolLM2's
KEPT_FIELDS = ("prompt", "messages", "stream", "echo", "add_generation_prompt")


def served_model(case):
    """Generated bodies hold ~25 optional fields, almost always one out of the server's ranges (a
    400 the document allows), and name a random model: these keep the generated prompt or
    messages (with content) and stream flag, token ids folded into the vocabulary, for the served
    model and 4 tokens, so the fuzzed text and token ids reach the engine."""
    if isinstance(case.body, dict):
        case.body = {key: value for key, value in case.body.items() if key in KEPT_FIELDS}
        case.body.update(model=MODEL_NAME, max_tokens=4)
        if "prompt" in case.body:
            case.body["prompt"] = _in_vocabulary(case.body["prompt"]) or "Hi"
        for message in case.body.get("messages") or []:
            if isinstance(message, dict) and message.get("content") is None:
                message["content"] = "Hi"
    return case


def _in_vocabulary(prompt):
    if isinstance(prompt, int):
        return abs(prompt) % VOCAB_SIZE
    if isinstance(prompt, list):
        folded = [_in_vocabulary(item) for item in prompt]
        return [item for item in folded if item not in ("", [])] or None
    return prompt


@pytest.mark.parametrize("mode", [*GenerationMode, "served_model"])
@pytest.mark.parametrize(("method", "path"), OPERATIONS)
def test_no_5xx_and_every_response_matches_the_document(api_schema, fuzz_server: ServerProcess, method: str,
                                                         path: str, mode: GenerationMode | str) -> None:
    """Positive mode: bodies valid by the schema (many still fail the server's own range checks,
    which are 400s the document lists); negative: bodies the schema forbids; served_model:
    positive bodies for the served model."""
    if mode != GenerationMode.POSITIVE and (method == "GET" or path in ("/tokenize", "/detokenize")
                                            and mode == "served_model"):
        pytest.skip("nothing to vary: a GET without parameters, or a route that needs no model")
    operation = api_schema[path][method]
    if mode == "served_model":
        strategy = operation.as_strategy(generation_mode=GenerationMode.POSITIVE).map(served_model)
    else:
        strategy = operation.as_strategy(generation_mode=mode)
    responses = Counter()

    @given(case=strategy)
    @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def call(case) -> None:
        responses[case.call_and_validate(base_url=fuzz_server.base_url, checks=CHECKS, timeout=60).status_code] += 1

    call()
    if mode == "served_model" and path.startswith("/v1/"):
        assert responses[200] > 0, responses  # some reached the model and were answered
