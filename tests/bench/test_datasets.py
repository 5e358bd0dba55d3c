"""The benchmark datasets: ShareGPT loading and filtering on the real data, random prompts."""

from __future__ import annotations

from typing import Any

import pytest

from engine.bench import datasets
from engine.bench.datasets import SampleRequest, load_sharegpt, sample_random, sample_sharegpt


class WhitespaceTokenizer:
    """One token per whitespace-separated word: enough to check the filters' arithmetic."""

    def encode(self, text: str) -> list[int]:
        return [len(word) for word in text.split()]


class CountingTokenizer:
    """Ids print as themselves; 0 is EOS and 1 is another special token."""

    vocab_size = 50
    eos_token_id = 0
    all_special_ids = [0, 1]

    def encode(self, text: str) -> list[int]:
        return [int(word) for word in text.split()]

    def decode(self, token_ids: list[int]) -> str:
        return " ".join(map(str, token_ids))


def _record(*turns: tuple[str, str]) -> dict[str, Any]:
    return {"id": "x", "conversations": [{"from": who, "value": value} for who, value in turns]}


def _words(n: int) -> str:
    return " ".join(["w"] * n)


# --- loading ---------------------------------------------------------------------------------

def test_load_sharegpt_keeps_the_complete_records() -> None:
    records = load_sharegpt()
    assert 17_000 <= len(records) <= 18_500
    assert all(isinstance(record["conversations"], list) for record in records)
    assert load_sharegpt() is records  # parsed once per process


@pytest.mark.parametrize("text, expected", [
    ('[{"a": 1}, {"b": [2, "]"]}, {"c": "trunc', [{"a": 1}, {"b": [2, "]"]}]),  # cut inside a string
    ('[\n  {"a": 1},\n  {"b": ', [{"a": 1}]),  # cut between key and value
    ('[{"a": 1}, {"b": 2}]', [{"a": 1}, {"b": 2}]),  # not truncated at all
    ("[ ]", []),
])
def test_complete_list_items_stops_at_the_truncated_tail(text: str, expected: list[Any]) -> None:
    assert list(datasets._complete_list_items(text)) == expected


# --- ShareGPT sampling on the real data -------------------------------------------------------

def test_sample_sharegpt_respects_every_filter() -> None:
    tokenizer = WhitespaceTokenizer()
    requests = sample_sharegpt(tokenizer, 200, seed=3, max_prompt_len=40, max_model_len=120,
                               max_prompt_chars=200)
    assert len(requests) == 200
    assert len({request.prompt for request in requests}) > 190  # a few prompts repeat in ShareGPT
    for request in requests:
        assert request.prompt_len == len(tokenizer.encode(request.prompt))
        assert 4 <= request.prompt_len <= 40
        assert len(request.prompt) <= 200
        assert request.expected_output_len >= 4
        assert request.prompt_len + request.expected_output_len <= 120
        assert request.prompt_token_ids is None


def test_sample_sharegpt_fixed_output_len() -> None:
    requests = sample_sharegpt(WhitespaceTokenizer(), 50, fixed_output_len=7)
    assert [request.expected_output_len for request in requests] == [7] * 50


def test_sample_sharegpt_is_deterministic_per_seed() -> None:
    tokenizer = WhitespaceTokenizer()
    first = sample_sharegpt(tokenizer, 30, seed=1)
    assert sample_sharegpt(tokenizer, 30, seed=1) == first
    assert sample_sharegpt(tokenizer, 30, seed=2) != first
    assert sample_sharegpt(tokenizer, 10, seed=1) == first[:10]  # a prefix: picking walks one order


# --- ShareGPT filters, exactly, on hand-made records ----------------------------------------

def test_sample_sharegpt_filters_hand_made_records(monkeypatch: pytest.MonkeyPatch) -> None:
    records = (
        _record(("human", _words(5)), ("gpt", _words(6))),  # kept: 5 + 6
        _record(("human", _words(3)), ("gpt", _words(6))),  # prompt under 4 tokens
        _record(("human", _words(5)), ("gpt", _words(3))),  # reference answer under 4 tokens
        _record(("human", _words(9)), ("gpt", _words(4))),  # prompt over max_prompt_len
        _record(("human", _words(8)), ("gpt", _words(13))),  # 21 tokens, over max_model_len
        _record(("gpt", "hello there you"), ("human", _words(6)), ("gpt", _words(4))),  # kept: 6 + 4
        _record(("human", _words(5))),  # no answer
        {"id": "empty", "conversations": []},
    )
    monkeypatch.setattr(datasets, "load_sharegpt", lambda: records)
    tokenizer = WhitespaceTokenizer()
    kept = sample_sharegpt(tokenizer, 2, max_prompt_len=8, max_model_len=20)
    assert sorted((r.prompt_len, r.expected_output_len) for r in kept) == [(5, 6), (6, 4)]
    with pytest.raises(ValueError, match="only 2 ShareGPT requests"):
        sample_sharegpt(tokenizer, 3, max_prompt_len=8, max_model_len=20)
    # A fixed output length lifts the reference-answer filter but still counts toward max_model_len.
    fixed = sample_sharegpt(tokenizer, 4, max_prompt_len=8, max_model_len=20, fixed_output_len=12)
    assert sorted(r.prompt_len for r in fixed) == [5, 5, 6, 8]
    short = sample_sharegpt(tokenizer, 2, max_prompt_len=8, max_model_len=20, max_prompt_chars=11)
    # Prompts are cut to 11 characters ("w w w w w w": 6 words), never skipped for length.
    assert len(short) == 2 and all(len(r.prompt) <= 11 and r.prompt_len <= 6 for r in short)


def test_sample_sharegpt_caps_output_len_before_the_model_len_filter(monkeypatch: pytest.MonkeyPatch) -> None:
    records = (
        _record(("human", _words(5)), ("gpt", _words(13))),  # 5 + 13 > 12, but 5 + 6 fits
        _record(("human", _words(6)), ("gpt", _words(4))),  # under the cap: kept as is
        _record(("human", _words(5)), ("gpt", _words(3))),  # the reference is still too short
    )
    monkeypatch.setattr(datasets, "load_sharegpt", lambda: records)
    kept = sample_sharegpt(WhitespaceTokenizer(), 2, max_model_len=12, max_output_len=6)
    assert sorted((r.prompt_len, r.expected_output_len) for r in kept) == [(5, 6), (6, 4)]
    with pytest.raises(ValueError, match="only 1"):
        sample_sharegpt(WhitespaceTokenizer(), 2, max_model_len=12)
    with pytest.raises(ValueError, match="max_output_len"):
        sample_sharegpt(WhitespaceTokenizer(), 1, max_output_len=0)


def test_sample_sharegpt_rejects_a_non_positive_fixed_output_len() -> None:
    with pytest.raises(ValueError, match="fixed_output_len"):
        sample_sharegpt(WhitespaceTokenizer(), 1, fixed_output_len=0)


# --- random ----------------------------------------------------------------------------------

def test_sample_random_exact_lengths_without_range() -> None:
    tokenizer = CountingTokenizer()
    requests = sample_random(tokenizer, 20, input_len=12, output_len=5, seed=4)
    for request in requests:
        assert request.prompt_len == len(request.prompt_token_ids) == 12
        assert request.expected_output_len == 5
        assert tokenizer.encode(request.prompt) == request.prompt_token_ids
        assert all(2 <= token_id < 50 for token_id in request.prompt_token_ids)  # no special ids


def test_sample_random_lengths_within_range_and_seeded() -> None:
    tokenizer = CountingTokenizer()
    requests = sample_random(tokenizer, 300, input_len=100, output_len=20, range_ratio=0.5, seed=7)
    input_lens = [request.prompt_len for request in requests]
    output_lens = [request.expected_output_len for request in requests]
    assert 50 <= min(input_lens) < 60 and 140 < max(input_lens) <= 150  # spread over the range
    assert all(10 <= n <= 30 for n in output_lens)
    assert sample_random(tokenizer, 300, 100, 20, 0.5, seed=7) == requests
    assert sample_random(tokenizer, 300, 100, 20, 0.5, seed=8) != requests


def test_sample_random_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="range_ratio"):
        sample_random(CountingTokenizer(), 1, 10, 10, range_ratio=1.0)
    with pytest.raises(ValueError, match="positive"):
        sample_random(CountingTokenizer(), 1, 0, 10)


def test_sample_request_is_frozen() -> None:
    request = SampleRequest(prompt="hi", prompt_len=1, expected_output_len=2)
    with pytest.raises(AttributeError):
        request.prompt_len = 3  # type: ignore[misc]
