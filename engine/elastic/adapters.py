"""The distilled recovery terms of an elastic checkpoint: `adapters.safetensors` in its directory.

Distillation (engine/elastic/distill.py) retrains each level's recovery terms; the runtime uses
this file's terms instead of the closed-form ones when it is present.  Tensor names are the
checkpoint's (engine/elastic/checkpoint.py), for non-anchor layers l and levels L < 100:

    levels.{L}.layers.{l}.ffn.lora_a   [r, H]     block_out += (x_normed @ lora_a.T) @ lora_b.T
    levels.{L}.layers.{l}.ffn.lora_b   [H, r]
    levels.{L}.layers.{l}.ffn.bias     [H]        block_out += bias
    levels.{L}.layers.{l}.attn.*       the same for the attention block

A level is in the file only once it is finished: the file is rewritten (to a temporary name, then
renamed) after each level, and its metadata lists the finished levels with their training report,
so a rerun skips them.  The metadata also names the model file the checkpoint was made from; a
file made for another checkpoint is not resumed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, safe_open, save_file

from engine.elastic.checkpoint import ADAPTERS_FILE, BLOCKS, TERMS, correction_tensors
from engine.elastic.torch_model import BlockCorrection, LayerCorrection

FORMAT = "elastic-adapters/1"
# Issue #13: adapters plus biases of all levels at most this fraction of the model's parameters.
MAX_PARAMETER_FRACTION = 0.02


@dataclass(frozen=True)
class StoredAdapters:
    """What adapters.safetensors holds: finished levels' tensors and their training reports."""

    checkpoint_digest: str
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    reports: dict[int, dict[str, Any]] = field(default_factory=dict)  # level -> report (JSON-able)

    def with_level(self, level: int, tensors: Mapping[str, torch.Tensor], report: dict[str, Any]) -> StoredAdapters:
        kept = {name: t for name, t in self.tensors.items() if not name.startswith(f"levels.{level}.")}
        return StoredAdapters(self.checkpoint_digest, {**kept, **tensors}, {**self.reports, level: report})


def tensor_name(level: int, layer: int, block: str, term: str) -> str:
    return f"levels.{level}.layers.{layer}.{block}.{term}"


def level_tensors(level: int, corrections: Sequence[LayerCorrection | None]) -> dict[str, torch.Tensor]:
    """One level's corrections as named, detached copies (absent terms are left out)."""
    return {name: tensor.clone() for name, tensor in correction_tensors(level, list(corrections)).items()}


def level_corrections(level: int, tensors: Mapping[str, torch.Tensor], num_layers: int) -> list[LayerCorrection | None]:
    """The inverse of level_tensors: one LayerCorrection (or None) per layer.  (checkpoint.py reads the
    same names into a whole checkpoint; this reads one level of any tensor dict.)"""
    corrections: list[LayerCorrection | None] = []
    for layer in range(num_layers):
        blocks = {}
        for block in BLOCKS:
            terms = {term: tensors.get(tensor_name(level, layer, block, term)) for term in TERMS}
            blocks[block] = BlockCorrection(**terms) if any(t is not None for t in terms.values()) else None
        corrections.append(LayerCorrection(**blocks) if any(blocks.values()) else None)
    return corrections


def save_adapters(directory: Path, stored: StoredAdapters) -> Path:
    """Write the file atomically: a crash mid-write leaves the previous file (and its levels)."""
    path = directory / ADAPTERS_FILE
    temporary = path.with_name(path.name + ".partial")
    metadata = {"format": FORMAT, "checkpoint_digest": stored.checkpoint_digest,
                "reports": json.dumps({str(level): report for level, report in stored.reports.items()})}
    save_file(stored.tensors, str(temporary), metadata=metadata)
    os.replace(temporary, path)
    return path


def load_adapters(directory: Path, checkpoint_digest: str | None = None) -> StoredAdapters | None:
    """The directory's adapters, or None when it has none (or, given `checkpoint_digest`, when they
    were made for another model file)."""
    path = directory / ADAPTERS_FILE
    if not path.exists():
        return None
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is not an elastic adapters file (format {metadata.get('format')!r})")
    if checkpoint_digest is not None and metadata["checkpoint_digest"] != checkpoint_digest:
        return None
    reports = {int(level): report for level, report in json.loads(metadata["reports"]).items()}
    return StoredAdapters(metadata["checkpoint_digest"], load_file(str(path)), reports)


def num_parameters(tensors: Mapping[str, torch.Tensor] | Sequence[torch.Tensor]) -> int:
    values = tensors.values() if isinstance(tensors, Mapping) else tensors
    return sum(t.numel() for t in values)


def check_parameter_budget(num_adapter_parameters: int, num_model_parameters: int,
                           max_fraction: float = MAX_PARAMETER_FRACTION) -> str:
    """A line stating the adapters' share of the model; ValueError when it is over `max_fraction`."""
    fraction = num_adapter_parameters / num_model_parameters
    line = (f"adapters + biases of all levels: {num_adapter_parameters:,} parameters, {fraction:.2%} of the "
            f"model's {num_model_parameters:,} (at most {max_fraction:.0%})")
    if fraction > max_fraction:
        raise ValueError(line + ": lower the rank or the number of levels")
    return line
