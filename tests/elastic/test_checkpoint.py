"""The checkpoint's files and names round-trip; adapters override; the cache dir follows XDG."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from engine.elastic.checkpoint import (
    ADAPTERS_FILE,
    TENSORS_FILE,
    ElasticCheckpoint,
    ELASTIFY_VERSION,
    elastic_cache_dir,
    load_checkpoint,
    save_checkpoint,
    source_digest,
)
from engine.elastic.quality_table import QUALITY_FILE
from engine.elastic.spec import ElasticLevel, ElasticSpec
from engine.elastic.torch_model import BlockCorrection, LayerCorrection


def checkpoint() -> ElasticCheckpoint:
    levels = (ElasticLevel(100, (64, 64), (2, 2)), ElasticLevel(50, (64, 32), (2, 1)))
    spec = ElasticSpec("abc", 2, 8, 64, 4, 2, 2, 10, (0,), levels)
    corrections = {50: [None, LayerCorrection(attn=BlockCorrection(bias=torch.ones(8)),
                                              ffn=BlockCorrection(torch.zeros(8), torch.ones(2, 8), torch.ones(8, 2)))]}
    return ElasticCheckpoint(spec, torch.stack([torch.arange(64).flip(0)] * 2), torch.stack([torch.arange(4)] * 2),
                             corrections)


def test_round_trip_with_the_runtime_names(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, checkpoint())
    names = set(load_file(str(tmp_path / TENSORS_FILE)))
    assert names == {"layers.0.ffn_order", "layers.1.ffn_order", "layers.0.head_order", "layers.1.head_order",
                     "levels.50.layers.1.attn.bias", "levels.50.layers.1.ffn.bias", "levels.50.layers.1.ffn.lora_a",
                     "levels.50.layers.1.ffn.lora_b"}
    loaded = load_checkpoint(tmp_path)
    assert loaded.spec == checkpoint().spec and torch.equal(loaded.ffn_orders, checkpoint().ffn_orders)
    assert loaded.ffn_orders.dtype == torch.int64
    assert loaded.corrections[50][0] is None and loaded.corrections[50][1].attn.lora_a is None
    assert torch.equal(loaded.corrections[50][1].ffn.lora_a, torch.ones(2, 8))


def test_adapters_override_lora(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, checkpoint())
    save_file({"levels.50.layers.1.attn.lora_a": torch.full((2, 8), 3.0),
               "levels.50.layers.1.attn.lora_b": torch.zeros(8, 2)}, str(tmp_path / ADAPTERS_FILE))
    attn = load_checkpoint(tmp_path).corrections[50][1].attn
    assert torch.equal(attn.lora_a, torch.full((2, 8), 3.0)) and torch.equal(attn.bias, torch.ones(8))


def test_a_replaced_checkpoint_drops_what_was_derived_from_the_old_one(tmp_path: Path) -> None:
    """Adapters distilled from a checkpoint and its measured quality table describe that build
    only: saving the same checkpoint again keeps them, saving another (refitted) one drops them."""
    save_checkpoint(tmp_path, checkpoint())
    (tmp_path / ADAPTERS_FILE).write_bytes(b"distilled")
    (tmp_path / QUALITY_FILE).write_text("{}")
    save_checkpoint(tmp_path, checkpoint())
    assert (tmp_path / ADAPTERS_FILE).is_file() and (tmp_path / QUALITY_FILE).is_file()
    refitted = checkpoint()
    refitted.corrections[50][1].attn.bias.fill_(2.0)
    save_checkpoint(tmp_path, refitted)
    assert not (tmp_path / ADAPTERS_FILE).exists() and not (tmp_path / QUALITY_FILE).exists()
    assert torch.equal(load_checkpoint(tmp_path).corrections[50][1].attn.bias, torch.full((8,), 2.0))


def test_cache_dir_follows_xdg_and_the_file_digest(tmp_path: Path, monkeypatch) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"x" * 1000)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert elastic_cache_dir(model) == (tmp_path / "cache" / "elastic-engine" / "elastic"
                                        / f"{source_digest(model)}-v{ELASTIFY_VERSION}")
    before = source_digest(model)
    model.write_bytes(b"x" * 999 + b"y")
    assert source_digest(model) != before
