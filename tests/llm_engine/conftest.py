"""Fixtures of the end-to-end engine tests."""

from __future__ import annotations

import pytest

from engine.bench.datasets import first_exchange, load_sharegpt


@pytest.fixture(scope="session")
def sharegpt_prompts(llm_fp32) -> list[str]:
    tokenizer = llm_fp32.get_tokenizer()
    prompts = []
    for record in load_sharegpt():
        exchange = first_exchange(record)
        if exchange and 8 <= len(tokenizer.encode(exchange[0])) <= 200:
            prompts.append(exchange[0])
        if len(prompts) == 32:
            return prompts
    raise AssertionError("not enough prompts")
