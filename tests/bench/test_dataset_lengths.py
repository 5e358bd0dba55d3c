"""Random, long and prefix datasets, their lengths measured with the model's real tokenizer."""

from __future__ import annotations

from typing import Any

import pytest

from engine.bench.datasets import (LONG_QUESTION, PREFIX_SEPARATOR, SampleRequest, cap_output_lens, fit_text,
                                   sample_long, sample_prefix, sample_random)


def test_random_lengths(tokenizer: Any) -> None:
    requests = sample_random(tokenizer, 20, input_len=100, output_len=16, range_ratio=0.2, seed=5)
    for request in requests:
        assert request.prompt_len == len(request.prompt_token_ids) and 80 <= request.prompt_len <= 120
        assert 12 <= request.expected_output_len <= 19
        assert tokenizer.eos_token_id not in request.prompt_token_ids


def test_long_documents_have_the_asked_length_and_share_nothing(tokenizer: Any) -> None:
    requests = sample_long(tokenizer, 4, input_len=600, output_len=32, seed=1)
    for request in requests:
        assert request.prompt_len == len(tokenizer.encode(request.prompt))
        assert 600 - 4 <= request.prompt_len <= 600  # only BPE merges at the cut can cost a token or two
        assert request.prompt.endswith(LONG_QUESTION)
        assert request.expected_output_len == 32
    starts = {tuple(tokenizer.encode(request.prompt)[:32]) for request in requests}
    assert len(starts) == 4  # disjoint documents: nothing for a prefix cache to share
    assert sample_long(tokenizer, 4, input_len=600, output_len=32, seed=1) == requests


def test_prefix_requests_share_few_system_prompts(tokenizer: Any) -> None:
    requests = sample_prefix(tokenizer, 9, prefix_len=128, num_prefixes=3, seed=2, max_model_len=1024,
                             max_output_len=64)
    prefixes = [request.chat_messages[0]["content"] for request in requests]
    assert len(set(prefixes)) == 3
    assert prefixes[:3] == prefixes[3:6] == prefixes[6:]  # request i gets prefix i % 3
    for request, prefix in zip(requests, prefixes):
        assert 124 <= len(tokenizer.encode(prefix)) <= 128
        system, user = request.chat_messages
        assert (system["role"], user["role"]) == ("system", "user")
        assert request.prompt == prefix + PREFIX_SEPARATOR + user["content"]
        assert request.prompt_len == len(tokenizer.encode(request.prompt))
        assert request.prompt_len + request.expected_output_len <= 1024
        assert 4 <= request.expected_output_len <= 64


def test_fit_text_refuses_a_suffix_longer_than_the_target(tokenizer: Any) -> None:
    with pytest.raises(ValueError, match="suffix"):
        fit_text(tokenizer, list(range(100, 200)), 5, suffix=LONG_QUESTION)


def test_cap_output_lens() -> None:
    requests = [SampleRequest("a", 1, 10), SampleRequest("b", 1, 3)]
    assert [r.expected_output_len for r in cap_output_lens(requests, 5)] == [5, 3]
    assert cap_output_lens(requests, None) is requests
