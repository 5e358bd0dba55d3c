"""adapters.safetensors: names as the checkpoint's, a round trip per level, finished levels and
their reports in the metadata, and the 2% parameter budget."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.elastic.adapters import (
    StoredAdapters,
    check_parameter_budget,
    level_corrections,
    level_tensors,
    load_adapters,
    num_parameters,
    save_adapters,
)
from engine.elastic.torch_model import BlockCorrection, LayerCorrection

HIDDEN, RANK = 6, 2


def corrections(seed: int) -> list[LayerCorrection | None]:
    """Layer 0 an anchor (no terms); layer 1 both blocks; layer 2 only an FFN bias."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    both = LayerCorrection(attn=BlockCorrection(rand(HIDDEN), rand(RANK, HIDDEN), rand(HIDDEN, RANK)),
                           ffn=BlockCorrection(rand(HIDDEN), rand(RANK, HIDDEN), rand(HIDDEN, RANK)))
    return [None, both, LayerCorrection(ffn=BlockCorrection(bias=rand(HIDDEN)))]


def test_names_follow_the_checkpoint_and_round_trip() -> None:
    original = corrections(0)
    tensors = level_tensors(80, original)
    assert sorted(tensors) == sorted(
        [f"levels.80.layers.1.{block}.{term}" for block in ("attn", "ffn") for term in ("lora_a", "lora_b", "bias")]
        + ["levels.80.layers.2.ffn.bias"])
    assert tensors["levels.80.layers.1.ffn.lora_a"].shape == (RANK, HIDDEN)
    assert tensors["levels.80.layers.1.ffn.lora_b"].shape == (HIDDEN, RANK)
    restored = level_corrections(80, tensors, num_layers=3)
    assert restored[0] is None and restored[2].attn is None and restored[2].ffn.lora_a is None
    assert torch.equal(restored[1].attn.lora_b, original[1].attn.lora_b)
    assert torch.equal(restored[2].ffn.bias, original[2].ffn.bias)


def test_file_keeps_finished_levels_and_their_reports(tmp_path: Path) -> None:
    stored = StoredAdapters("digest-a").with_level(90, level_tensors(90, corrections(0)), {"num_steps": 3})
    stored = stored.with_level(70, level_tensors(70, corrections(1)), {"num_steps": 5})
    save_adapters(tmp_path, stored)
    loaded = load_adapters(tmp_path, "digest-a")
    assert loaded is not None and loaded.reports == {90: {"num_steps": 3}, 70: {"num_steps": 5}}
    assert loaded.tensors.keys() == stored.tensors.keys()
    assert all(torch.equal(loaded.tensors[name], stored.tensors[name]) for name in stored.tensors)
    assert not list(tmp_path.glob("*.partial"))
    # Redoing a level replaces its tensors, not adds to them.
    redone = loaded.with_level(90, level_tensors(90, corrections(2)[:2]), {"num_steps": 1})
    assert num_parameters(redone.tensors) == num_parameters(stored.tensors) - HIDDEN


def test_adapters_of_another_model_file_are_not_resumed(tmp_path: Path) -> None:
    assert load_adapters(tmp_path) is None
    save_adapters(tmp_path, StoredAdapters("digest-a").with_level(90, level_tensors(90, corrections(0)), {}))
    assert load_adapters(tmp_path, "digest-b") is None
    assert load_adapters(tmp_path) is not None


def test_parameter_budget_of_smollm2_with_rank_8_at_every_layer_and_four_levels() -> None:
    # SmolLM2-135M: 30 layers, H = 576, 134.5M parameters.  Even with side paths at every layer
    # (anchors have none) four levels of rank 8 with biases stay under 2%.
    per_block = 2 * 8 * 576 + 576
    line = check_parameter_budget(4 * 30 * 2 * per_block, 134_515_008)
    assert "1.75%" in line
    with pytest.raises(ValueError, match="lower the rank"):
        check_parameter_budget(3_000_000, 134_515_008)
