"""Shared fixtures of the benchmark tests: the real tokenizer, and a real server on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.api.conftest import ServerProcess, running_server


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    """The default model's own tokenizer (SmolLM2: no BOS, EOS id 2)."""
    from engine.model.loader import load_tokenizer, resolve_model

    return load_tokenizer(resolve_model(None))


@pytest.fixture(scope="session")
def bench_server() -> Iterator[ServerProcess]:
    """Our server with a small KV cache and token budget (1,024-token context), for short runs."""
    yield from running_server("--max-num-batched-tokens", "256", "--max-num-seqs", "8")
