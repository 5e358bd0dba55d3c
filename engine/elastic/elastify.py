"""Elastification of a model, once: calibration -> importance -> anchors -> widths -> closed-form
recovery -> the elastic checkpoint (engine/elastic/checkpoint.py), with progress bars.

    elastify(None)                       # the default model, DEFAULT_LEVELS, the fast defaults
    engine elastify --model M --levels 100,90,80,70,50 [--force]

Resumable: each stage's result is saved under the checkpoint directory's stages/, keyed by the
settings it depends on; a rerun (after an interruption, or with only later settings changed)
loads the finished stages and computes the rest.  The default sizes finish well under ~2.5
minutes on two CPU cores for SmolLM2-135M (the first `engine serve` runs this); every size is a
field of ElastifyConfig.

Decisions and the measurements behind them (SmolLM2-135M, perplexity on 8 held-out ShareGPT
answers; the full model 4.81), each noted where its default lives:
- importance: |per-sequence Taylor sum| (importance.py, the issue's measurement);
- anchors: single-layer ablation to the floor (anchors.py).  A first-order estimate from the
  importance scores alone picks other layers ({0,1,2,3,4,11} against {0,1,5,19,24,27}), so the
  ablations are paid for;
- allocation: per-layer by normalised importance; uniform measured the same within noise at
  level 80 (51.1 vs 51.7) and 40 (198 vs 194) with heads pruned everywhere; query-head ranks
  only at levels <= 55 (allocation.py: 7.97 vs 51.7 at level 80);
- recovery: bias + rank-8 ridge on the pruned model's own inputs (recovery.py: 60 vs 332 at 40);
- calibration size: the first serve's quick one, or `engine elastify`'s THOROUGH (below).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from engine.bench.conversations import Conversation
from engine.elastic import calibration
from engine.elastic.allocation import AllocationConfig, allocate_levels
from engine.elastic.anchors import ANCHOR_FRACTION, ablation_losses, choose_anchors
from engine.elastic.checkpoint import ElasticCheckpoint, elastic_cache_dir, save_checkpoint, source_digest
from engine.elastic.importance import Importance, ffn_orders, head_orders, taylor_importance
from engine.elastic.recovery import RecoveryConfig, fit_recovery
from engine.elastic.spec import FULL_LEVEL, ElasticLevel, ElasticSpec
from engine.elastic.torch_model import LayerCorrection, LayerSelection, TorchLlama, prefix_submodel

logger = logging.getLogger(__name__)

# The floor (40) is where the lowest level's FLOP fraction (ElasticSpec.flop_fraction) reaches
# about 0.64 on SmolLM2-135M: anchors and the LM head stay whole, so a nominal 40% costs 64%.
DEFAULT_LEVELS = (100, 90, 80, 70, 55, 40)
T = TypeVar("T")


@dataclass(frozen=True)
class ElastifyConfig:
    """Sizes and choices of one elastification.  The default sizes are the fast ones (the first
    `engine serve` runs them; see the module docstring for their cost), in calibration tokens:
    forward + backward of ~1.5k (importance), ~15 forwards of ~400 (anchor ablations, each
    layer ablated runs the layers after it), and ~4 forwards of ~1.1k without the LM head
    (every level's recovery at once).  benchmarks/elastic_quality.py takes larger ones."""

    level_values: tuple[int, ...] = DEFAULT_LEVELS
    max_seq_len: int = 192  # calibration conversations are cut to this many tokens
    num_importance_sequences: int = 8
    num_ablation_sequences: int = 2
    num_recovery_sequences: int = 6
    batch_size: int = 4
    anchor_fraction: float = ANCHOR_FRACTION
    allocation: AllocationConfig = field(default_factory=AllocationConfig)
    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)

    def __post_init__(self) -> None:
        values = self.level_values
        if not values or values[0] != FULL_LEVEL or any(a <= b for a, b in zip(values, values[1:])) or values[-1] <= 0:
            raise ValueError(f"levels must start at {FULL_LEVEL} and fall strictly, got {list(values)}")

    @property
    def floor(self) -> int:
        return self.level_values[-1]


# `engine elastify`'s sizes.  The first `engine serve` builds with ElastifyConfig()'s, which keep it
# ready within 3 minutes; an explicit elastify spends ~5 minutes more on calibration, and the
# levels measure better for it (benchmarks/elastic_quality.py --num-conversations 16, closed-form
# recovery, perplexity at 90 / 80 / 70, the full model 5.29; AMD EPYC, 2026-12-04):
#     8 importance + 6 recovery sequences    7.15 / 10.32 / 14.27   (top-1 76 / 65 / 59%)
#    64 + 32                                 6.72 /  8.83 / 12.41   (79 / 70 / 62%)
#   256 + 64                                 6.61 /  8.65 / 11.85   (79 / 70 / 62%)
# Taylor scores summed over 8 conversations are noisy: the order, not only the recovery, gains.
THOROUGH = ElastifyConfig(num_importance_sequences=256, num_recovery_sequences=64)


@dataclass(frozen=True)
class ElastifyResult:
    directory: Path
    spec: ElasticSpec
    seconds: float

    def flop_fractions(self, context_len: int = 0) -> dict[int, float]:
        return {value: self.spec.flop_fraction(value, context_len) for value in self.spec.level_values}


@dataclass(frozen=True)
class Artifacts:
    """Everything elastification computed, for the checkpoint and for quality measurements."""

    model: TorchLlama
    importance: Importance
    ffn_orders: torch.Tensor
    head_orders: torch.Tensor
    spec: ElasticSpec
    corrections: dict[int, list[LayerCorrection | None]]
    calibration: list[Conversation]


def elastify(model: str | None = None, config: ElastifyConfig | None = None, force: bool = False,
             progress: bool = True, directory: Path | None = None) -> ElastifyResult:
    """Build (or finish) the elastic checkpoint of `model`; -> where it went and its spec."""
    from engine.model.loader import resolve_model

    start = time.perf_counter()
    directory = directory or elastic_cache_dir(resolve_model(model).path)
    artifacts = compute_artifacts(model, config or ElastifyConfig(), directory, force, progress)
    save_checkpoint(directory, ElasticCheckpoint(artifacts.spec, artifacts.ffn_orders, artifacts.head_orders,
                                                 artifacts.corrections))
    return ElastifyResult(directory, artifacts.spec, time.perf_counter() - start)


def compute_artifacts(model: str | None, config: ElastifyConfig, directory: Path, force: bool = False,
                      progress: bool = True) -> Artifacts:
    """Every stage, each loaded from `directory`/stages when already finished with these settings."""
    from engine.model.loader import resolve_model

    source = resolve_model(model)
    stages = _Stages(directory / "stages", force)
    torch_model = TorchLlama(source.arch, _fp32_weights(model))
    num_sequences = max(config.num_importance_sequences, config.num_ablation_sequences, config.num_recovery_sequences)
    conversations = stages.get("calibration", (num_sequences, config.max_seq_len),
                               lambda: calibration.calibration_sequences(calibration.default_tokenizer(model),
                                                                         num_sequences, config.max_seq_len))
    batches = lambda n: list(calibration.batches(conversations[:n], config.batch_size, answers_only=False))  # noqa: E731
    importance = stages.get("importance", (num_sequences, config.max_seq_len, config.num_importance_sequences),
                            lambda: taylor_importance(torch_model, batches(config.num_importance_sequences), progress))
    orders = ffn_orders(importance), head_orders(importance, source.arch.num_kv_heads)
    anchors = stages.get("anchors", (importance.ffn.sum().item(), config.num_ablation_sequences, config.floor,
                                     config.anchor_fraction),
                         lambda: _anchors(torch_model, config, orders, conversations, progress))
    levels = allocate_levels(source.arch, importance, *orders, anchors, config.level_values, config.allocation)
    spec = _spec(source_digest(source.path), source.arch, anchors, levels)
    submodels = {level.level: prefix_submodel(level, *orders, source.arch.num_kv_heads) for level in levels[1:]}
    corrections = stages.get("recovery", (spec.to_json(), asdict(config.recovery), config.num_recovery_sequences),
                             lambda: fit_recovery(torch_model, batches(config.num_recovery_sequences), submodels,
                                                  anchors, config.recovery, progress))
    return Artifacts(torch_model, importance, orders[0], orders[1], spec, corrections, conversations)


def _anchors(model: TorchLlama, config: ElastifyConfig, orders: tuple[torch.Tensor, torch.Tensor],
             conversations: list[Any], progress: bool) -> tuple[int, ...]:
    """Ablate each layer alone to the floor level's uniform widths; the most sensitive are anchors."""
    arch, multiple = model.config, config.allocation.width_multiple
    width = max(multiple, round(config.floor / FULL_LEVEL * arch.intermediate_size / multiple) * multiple)
    ranks = max(1, round(config.floor / FULL_LEVEL * arch.num_heads // arch.num_kv_heads))
    floor = ElasticLevel(config.floor, (width,) * arch.num_layers, (ranks,) * arch.num_layers)
    ablated: list[LayerSelection] = prefix_submodel(floor, *orders, arch.num_kv_heads)
    batch = calibration.pad(conversations[:config.num_ablation_sequences], answers_only=False)
    rises = ablation_losses(model, batch, ablated, progress)
    logger.info("anchor ablation loss rises per layer: %s", [round(float(r), 3) for r in rises])
    return choose_anchors(rises, config.anchor_fraction)


def _spec(digest: str, arch: Any, anchors: tuple[int, ...], levels: tuple[ElasticLevel, ...]) -> ElasticSpec:
    return ElasticSpec(source_digest=digest, num_layers=arch.num_layers, hidden_size=arch.hidden_size,
                       intermediate_size=arch.intermediate_size, num_heads=arch.num_heads,
                       num_kv_heads=arch.num_kv_heads, head_dim=arch.head_dim, vocab_size=arch.vocab_size,
                       anchor_layers=anchors, levels=levels)


def _fp32_weights(model: str | None) -> dict[str, torch.Tensor]:
    from engine.elastic.torch_model import iter_fp32_weights

    return dict(iter_fp32_weights(model))


class _Stages:
    """Finished stages under `directory`: stage name + a digest of what it depends on -> a file."""

    def __init__(self, directory: Path, force: bool) -> None:
        self.directory, self.force = directory, force
        directory.mkdir(parents=True, exist_ok=True)

    def get(self, name: str, depends_on: Any, compute: Callable[[], T]) -> T:
        key = hashlib.sha256(json.dumps(depends_on, sort_keys=True, default=str).encode()).hexdigest()[:12]
        path = self.directory / f"{name}-{key}.pt"
        if path.is_file() and not self.force:
            logger.info("elastify: %s loaded from %s", name, path)
            return torch.load(path, weights_only=False)
        started = time.perf_counter()
        result = compute()
        partial = path.with_suffix(".partial")
        torch.save(result, partial)
        partial.replace(path)
        logger.info("elastify: %s took %.1f s", name, time.perf_counter() - started)
        return result
