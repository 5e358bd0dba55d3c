"""The elastic checkpoint on disk, and where it lives.

A directory per model file, under the user cache (never committed):

    ~/.cache/elastic-engine/elastic/<source digest>/     ($XDG_CACHE_HOME respected)
        spec.json              ElasticSpec.to_json(): levels, per-layer widths, anchors
        elastic.safetensors    the orders and the closed-form recovery (names below)
        adapters.safetensors   optional, written by distillation: same names, overrides
        stages/                elastify's resumable intermediate results

Tensor names in elastic.safetensors (the runtime reads exactly these):

    layers.{l}.ffn_order                    int64 [intermediate]  position i holds original neuron ffn_order[i]
    layers.{l}.head_order                   int64 [num_heads]     rank-major slot s holds original head head_order[s]
    levels.{L}.layers.{l}.ffn.bias          fp32 [H]   added to the FFN block's output
    levels.{L}.layers.{l}.attn.bias         fp32 [H]   added to the attention block's output
    levels.{L}.layers.{l}.{ffn,attn}.lora_a fp32 [r, H]
    levels.{L}.layers.{l}.{ffn,attn}.lora_b fp32 [H, r]
        block output += (x_normed @ lora_a.T) @ lora_b.T, x_normed the block's input after its RMSNorm

for each level value L < 100 and non-anchor layer l; a missing tensor means "none".
adapters.safetensors' lora_a / lora_b (and bias, where present) replace elastic.safetensors' ones.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from engine.cache_paths import cache_root
from engine.elastic.quality_table import QUALITY_FILE
from engine.elastic.spec import ElasticSpec
from engine.elastic.torch_model import BlockCorrection, LayerCorrection

SPEC_FILE = "spec.json"
TENSORS_FILE = "elastic.safetensors"
ADAPTERS_FILE = "adapters.safetensors"
BLOCKS = ("attn", "ffn")
TERMS = ("bias", "lora_a", "lora_b")
# The digest reads the head and tail of a file, not all of it: hashing a multi-GB model on every
# start would take seconds to minutes; size + first and last DIGEST_SPAN bytes (the GGUF header
# with every tensor's name, type and offset, and the last tensors' data) tell apart any two files
# that are not deliberately forged to collide.
DIGEST_SPAN = 4 << 20


@dataclass(frozen=True)
class ElasticCheckpoint:
    spec: ElasticSpec
    ffn_orders: torch.Tensor  # int64 [num_layers, intermediate]
    head_orders: torch.Tensor  # int64 [num_layers, num_heads]
    # level value -> per layer its corrections (None for anchors); adapters already applied
    corrections: dict[int, list[LayerCorrection | None]] = field(default_factory=dict)
    directory: Path | None = None  # where it was loaded from (its quality.json lives there too)


# Bumped whenever elastify's defaults change what a checkpoint holds (levels, allocation,
# recovery), so that a cached checkpoint made by older code is rebuilt rather than served.
ELASTIFY_VERSION = 2


def elastic_cache_dir(model_path: Path) -> Path:
    """Where the checkpoint of this model file goes: the engine's cache root (shared with the C++
    kernel builds), elastic/, the file's digest and the elastify version."""
    return cache_root() / "elastic" / f"{source_digest(model_path)}-v{ELASTIFY_VERSION}"


def source_digest(path: Path) -> str:
    """A short digest of a model file (GGUF) or directory (HF: its config and weight files)."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix in (".json", ".safetensors"))
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.name}\0{size}\0".encode())
        with file.open("rb") as handle:
            digest.update(handle.read(DIGEST_SPAN))
            if size > 2 * DIGEST_SPAN:
                handle.seek(size - DIGEST_SPAN)
                digest.update(handle.read(DIGEST_SPAN))
    return digest.hexdigest()[:16]


def save_checkpoint(directory: Path, checkpoint: ElasticCheckpoint) -> None:
    """Write spec.json and elastic.safetensors (each to a temporary name, then renamed: a reader
    never sees half a checkpoint, and spec.json, the marker of a finished one, goes last).  When
    this replaces another checkpoint (other settings, `engine elastify` after the first serve's
    quick build), what was derived from that one goes: its distilled adapters (never applicable
    to this one) and its measured quality table."""
    directory.mkdir(parents=True, exist_ok=True)
    previous = checkpoint_digest(directory) if (directory / SPEC_FILE).is_file() else None
    tensors = {}
    for layer in range(checkpoint.spec.num_layers):
        tensors[f"layers.{layer}.ffn_order"] = checkpoint.ffn_orders[layer].to(torch.int64).contiguous()
        tensors[f"layers.{layer}.head_order"] = checkpoint.head_orders[layer].to(torch.int64).contiguous()
    for level, layers in checkpoint.corrections.items():
        tensors.update(correction_tensors(level, layers))
    partial = directory / (TENSORS_FILE + ".partial")
    save_file(tensors, str(partial))
    partial.replace(directory / TENSORS_FILE)
    partial = directory / (SPEC_FILE + ".partial")
    partial.write_text(checkpoint.spec.to_json())
    partial.replace(directory / SPEC_FILE)
    if previous is not None and checkpoint_digest(directory) != previous:
        for derived in (ADAPTERS_FILE, QUALITY_FILE):
            (directory / derived).unlink(missing_ok=True)


def checkpoint_digest(directory: Path) -> str:
    """Of the checkpoint's spec and closed-form terms: adapters distilled from another build of the
    checkpoint (elastify --force, other settings) are not resumed."""
    digest = hashlib.sha256()
    for name in (SPEC_FILE, TENSORS_FILE):
        digest.update((directory / name).read_bytes())
    return digest.hexdigest()[:16]


def correction_tensors(level: int, layers: list[LayerCorrection | None]) -> dict[str, torch.Tensor]:
    """One level's corrections under the checkpoint's names (also what adapters.safetensors holds)."""
    tensors = {}
    for layer, correction in enumerate(layers):
        for block in BLOCKS:
            terms = getattr(correction, block) if correction is not None else None
            for term in TERMS:
                value = getattr(terms, term) if terms is not None else None
                if value is not None:
                    tensors[f"levels.{level}.layers.{layer}.{block}.{term}"] = value.detach().float().contiguous()
    return tensors


def load_checkpoint(directory: Path, with_adapters: bool = True) -> ElasticCheckpoint:
    """The checkpoint in `directory`, with adapters.safetensors applied when present (and asked)."""
    spec = ElasticSpec.from_json((directory / SPEC_FILE).read_text())
    tensors = load_file(str(directory / TENSORS_FILE))
    adapters = directory / ADAPTERS_FILE
    if with_adapters and adapters.is_file():
        tensors.update(load_file(str(adapters)))
    orders = [torch.stack([tensors[f"layers.{layer}.{kind}"] for layer in range(spec.num_layers)])
              for kind in ("ffn_order", "head_order")]
    corrections = {level.level: _level_corrections(tensors, level.level, spec.num_layers)
                   for level in spec.levels[1:]}
    return ElasticCheckpoint(spec, orders[0], orders[1], corrections, directory=Path(directory))


def _level_corrections(tensors: dict[str, torch.Tensor], level: int, num_layers: int) -> list[LayerCorrection | None]:
    layers: list[LayerCorrection | None] = []
    for layer in range(num_layers):
        blocks = {}
        for block in BLOCKS:
            terms = {term: tensors.get(f"levels.{level}.layers.{layer}.{block}.{term}") for term in TERMS}
            blocks[block] = BlockCorrection(**terms) if any(v is not None for v in terms.values()) else None
        layers.append(LayerCorrection(**blocks) if any(blocks.values()) else None)
    return layers
