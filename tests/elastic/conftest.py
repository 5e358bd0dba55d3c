"""Shared fixtures of the elastic tests: the default model as a TorchLlama, loaded once."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def torch_llama():
    import torch

    from engine.elastic.torch_model import TorchLlama

    torch.manual_seed(0)
    return TorchLlama.load(None)
