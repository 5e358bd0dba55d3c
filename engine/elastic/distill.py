"""Distillation recovery: each level's side paths retrained so that the submodel's next-token
distribution follows the full model's (issue #13, recovery stage 2, after the closed-form stage).

    calibration conversations --> batches [B, T], right-padded (engine/elastic/calibration.py);
                                  the last batch is held aside as a probe (never trained on)
    full model (level 100, the same weights) --> the teacher: its targets for a batch are computed
                                  the first time any level needs them and kept for every later level
    per level L (90, 80, ... floor), resumable:
        side paths <- the closed-form terms (bias + rank-8 least-squares correction)
        AdamW on mean KL(teacher || submodel at L) over scored rows; only the side paths (and,
        when `train_biases`, the biases) train, the model's weights are frozen; the submodel runs
        under bf16 autocast where the CPU computes bf16 (`compute`), else in fp32
        stop before the next step would pass `budget_s` (the level's own wall clock: with top-k
        targets, the teacher's first pass over a batch is shared by every level and not on it),
        or at `max_steps` where one is set
        --> adapters.safetensors in the checkpoint directory, rewritten after each level

Per level, the training report (steps, tokens seen, seconds, loss at the start and end, the
probe's KL before and after) goes into the file's metadata beside the tensors.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from engine.bench.conversations import Conversation
from engine.elastic import calibration
from engine.elastic.adapters import (
    BLOCKS,
    MAX_PARAMETER_FRACTION,
    StoredAdapters,
    check_parameter_budget,
    level_tensors,
    load_adapters,
    num_parameters,
    save_adapters,
)
from engine.elastic.calibration import TokenBatch
from engine.elastic.checkpoint import checkpoint_digest
from engine.elastic.quality import scored_logits
from engine.elastic.quality_table import QUALITY_FILE
from engine.elastic.teacher_targets import TeacherTargets, bucketed_kl, full_kl
from engine.elastic.torch_model import BlockCorrection, LayerCorrection, LayerSelection, TorchLlama, prefix_submodel

PROBE_KEY = -1  # the teacher's key for the held-aside probe batch


@dataclass(frozen=True)
class DistillConfig:
    budget_s: float = 300.0  # per level, wall clock: no step starts that the slowest so far says would end past it
    # None: the budget alone ends a level.  A cap of 300 stopped levels 55 and 40 at 277-297 s on
    # an Intel Xeon with AMX; level 40 uncapped took 423 steps in its 300 s there, and its held-out
    # perplexity fell from 30.5 to 28.3 (fp32 torch, 32 held-out conversations, 2026-12-07).
    max_steps: int | None = None
    # Level 90 on an AMD EPYC, bf16, 5 minutes (probe KL from 0.170): 1e-3 0.145, 3e-3 0.142,
    # 6e-3 0.146, 1.2e-2 0.180 (diverges).
    learning_rate: float = 3e-3
    weight_decay: float = 0.0  # AdamW's; decay would pull the terms toward 0, not toward their closed form
    # A 5-minute budget on two shared cores buys tens of steps, not hundreds (a 4 x 256-token step
    # took ~25 s under load): small batches and a short warm-up make the most of them.
    warmup_steps: int = 5
    train_biases: bool = True  # else the closed-form biases stay as they are
    rank: int = 8  # of a side path the closed-form stage left out (one it fitted keeps its own rank)
    max_rank: int = 8  # issue #13: rank <= 8
    batch_size: int = 2  # sequences per step
    num_conversations: int = 512  # calibration conversations (ShareGPT, chat template); steps cycle through them
    seq_len: int = 256  # tokens per conversation, at most (longer ones are cut)
    top_k: int | None = 64  # teacher tokens kept per position; None: recompute the teacher each step, exact KL
    # The submodel's forward and backward under bf16 autocast ("bf16"), or fp32.  "auto": bf16 where
    # the CPU has bf16 dot products (AVX512-BF16, AMX), else fp32 (bf16 emulated on AVX2 is slower).
    # Measured on an AMD EPYC (AVX512-BF16): 423 against 250 tokens/s, so ~1.7x the steps in the
    # budget; the KL at the same terms 0.1424 against 0.1417.  Teacher targets, the loss and the
    # probe stay fp32; the trained terms are fp32 leaves either way.
    compute: str = "auto"
    seed: int = 0
    max_parameter_fraction: float = MAX_PARAMETER_FRACTION  # all levels' terms over the model's parameters

    def __post_init__(self) -> None:
        if self.budget_s <= 0 or (self.max_steps is not None and self.max_steps < 1) \
                or min(self.batch_size, self.num_conversations) < 1 or self.seq_len < 16:
            raise ValueError("budget_s, max_steps, batch_size and num_conversations must be positive, seq_len >= 16")
        if not 1 <= self.rank <= self.max_rank:
            raise ValueError(f"rank must be in 1..{self.max_rank}, got {self.rank}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be positive or None, got {self.top_k}")
        if self.compute not in ("auto", "bf16", "fp32"):
            raise ValueError(f"compute must be auto, bf16 or fp32, got {self.compute!r}")

    @property
    def autocast_bf16(self) -> bool:
        if self.compute == "auto":
            from engine.capabilities import cpu_features

            return cpu_features().computes_bf16
        return self.compute == "bf16"


@dataclass(frozen=True)
class LevelTask:
    """One level to distil: its submodel and the closed-form terms to start from (one entry per
    layer; None where the level has no terms, as at anchor layers)."""

    level: int
    submodel: Sequence[LayerSelection]
    initial: Sequence[LayerCorrection | None]


@dataclass(frozen=True)
class LevelReport:
    level: int
    num_steps: int
    num_tokens: int  # scored tokens the level trained on (repeats counted)
    seconds: float  # wall clock of the training loop: the budget's clock (top-k teacher passes not counted)
    stopped_by: str  # "budget" or "max_steps"
    first_loss: float  # mean KL of the first steps ...
    last_loss: float  # ... and of the last ones (each over up to 10 steps)
    probe_kl_before: float  # KL on the held-aside batch with the closed-form terms
    probe_kl_after: float  # and with the distilled ones
    train_biases: bool
    top_k: int | None
    compute: str = "fp32"  # the submodel's forward and backward: "bf16" (autocast) or "fp32"
    # The full model's top-k targets this level computed for batches no earlier level had used.
    # They are shared by every level, so they are not the level's training and not on its budget
    # (they took ~40% of level 90's 5 minutes, fp32, when they were).
    teacher_seconds: float = 0.0
    # The stopping rule's own figures (budget-clock seconds), so a test can check the rule rather
    # than a wall-clock bound: the last step started where the slowest step before it said it would
    # end by `last_step_predicted_end_s` (never past the budget), and the slowest step overall.
    last_step_predicted_end_s: float = 0.0
    slowest_step_s: float = 0.0


def calibration_batches(conversations: Sequence[Conversation], batch_size: int, seed: int = 0,
                        answers_only: bool = False) -> list[TokenBatch]:
    """Calibration batches (every token after the first scored; longest first, so little of a batch
    is padding) in a seeded random order: each step sees a mix of lengths over the run.
    `answers_only` scores the answers alone (measured worse at level 40: benchmarks/distill_level.py)
    and leaves out batches with no answer token (prompts cut at seq_len)."""
    batches = [b for b in calibration.batches(conversations, batch_size, answers_only) if b.num_scored]
    order = torch.randperm(len(batches), generator=torch.Generator().manual_seed(seed)).tolist()
    return [batches[i] for i in order]


class Teacher:
    """The full model's distributions on calibration batches, and a submodel's KL to them.

    With `top_k`, a batch's targets are computed once (the first time any level asks) and kept as
    top-k log-probabilities (engine/elastic/teacher_targets.py); without, the full model runs again
    for every step and the KL covers the whole vocabulary."""

    def __init__(self, model: TorchLlama, top_k: int | None) -> None:
        self.model = model
        self.top_k = top_k
        self._targets: dict[int, TeacherTargets] = {}

    def prepare(self, key: int, batch: TokenBatch) -> float:
        """Compute the batch's top-k targets unless kept from before; the seconds that took."""
        if self.top_k is None or key in self._targets:
            return 0.0
        start = time.perf_counter()
        self._targets[key] = TeacherTargets.from_logits(self._logits(batch), self.top_k)
        return time.perf_counter() - start

    def kl(self, key: int, batch: TokenBatch, student_logits: torch.Tensor) -> torch.Tensor:
        """Mean KL over the batch's scored rows; `student_logits` [num scored, vocab]."""
        if self.top_k is None:
            return full_kl(student_logits, self._logits(batch))
        self.prepare(key, batch)
        return bucketed_kl(student_logits, self._targets[key])

    @property
    def nbytes(self) -> int:
        return sum(targets.nbytes for targets in self._targets.values())

    def _logits(self, batch: TokenBatch) -> torch.Tensor:
        with torch.no_grad():
            return scored_logits(self.model, batch)


# --- the trained terms ---------------------------------------------------------------------------

def trainable_corrections(initial: Sequence[LayerCorrection | None], config: DistillConfig, hidden_size: int,
                          ) -> tuple[list[LayerCorrection | None], list[torch.Tensor]]:
    """Fresh leaf copies of the closed-form terms, and the ones that train.  A block without terms
    stays without (distillation retrains the closed-form stage's terms, it adds no blocks); a block
    with a bias but no side path gets a LoRA-style one (a small random, b zero: it starts at 0)."""
    generator = torch.Generator().manual_seed(config.seed)
    corrections: list[LayerCorrection | None] = []
    params: list[torch.Tensor] = []
    for correction in initial:
        if correction is None:
            corrections.append(None)
            continue
        blocks = {}
        for block in BLOCKS:
            terms = getattr(correction, block)
            blocks[block] = None if terms is None else _trainable_block(terms, config, hidden_size, generator, params)
        corrections.append(LayerCorrection(**blocks))
    return corrections, params


def _trainable_block(terms: BlockCorrection, config: DistillConfig, hidden_size: int, generator: torch.Generator,
                     params: list[torch.Tensor]) -> BlockCorrection:
    if terms.lora_a is not None and terms.lora_b is not None:
        if terms.lora_a.shape[0] > config.max_rank:
            raise ValueError(f"closed-form side path of rank {terms.lora_a.shape[0]} > {config.max_rank}")
        lora_a, lora_b = terms.lora_a.detach().clone(), terms.lora_b.detach().clone()
    else:
        lora_a = torch.randn(config.rank, hidden_size, generator=generator) / math.sqrt(hidden_size)
        lora_b = torch.zeros(hidden_size, config.rank)
    params += [lora_a.requires_grad_(), lora_b.requires_grad_()]
    bias = terms.bias.detach().clone() if terms.bias is not None else None
    if config.train_biases:
        bias = torch.zeros(hidden_size) if bias is None else bias
        params.append(bias.requires_grad_())
    return BlockCorrection(bias, lora_a, lora_b)


def num_model_parameters(model: TorchLlama) -> int:
    """Distinct weight tensors' elements (a tied LM head is the embedding table, counted once)."""
    distinct = {tensor.data_ptr(): tensor.numel() for tensor in model.weights.values()}
    return sum(distinct.values())


# --- one level -----------------------------------------------------------------------------------

def learning_rate_factor(step: int, progress: float, warmup_steps: int) -> float:
    """Linear warm-up over the first steps, then cosine decay over the budget's progress (0..1):
    the schedule follows the wall clock, since the budget, not a step count, ends training."""
    warmup = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
    return warmup * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def probe_kl(model: TorchLlama, teacher: Teacher, probe: TokenBatch, submodel: Sequence[LayerSelection],
             corrections: Sequence[LayerCorrection | None]) -> float:
    with torch.no_grad():
        return float(teacher.kl(PROBE_KEY, probe, scored_logits(model, probe, submodel, corrections)))


def distill_level(model: TorchLlama, task: LevelTask, batches: Sequence[TokenBatch], probe: TokenBatch,
                  teacher: Teacher, config: DistillConfig) -> tuple[list[LayerCorrection | None], LevelReport]:
    """Train one level's terms until the budget or max_steps; the trained terms and a report."""
    corrections, params = trainable_corrections(task.initial, config, model.config.hidden_size)
    if not params:
        raise ValueError(f"level {task.level} has no recovery terms to distil")
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    kl_before = probe_kl(model, teacher, probe, task.submodel, corrections)
    autocast = config.autocast_bf16
    # PERF: the level's weights cut (and cast for autocast) once, not gathered and cast every step:
    # ~10% of a level-40 step.  The probes run the uncut fp32 submodel.
    submodel = model.cut_submodel(task.submodel, torch.bfloat16 if autocast else torch.float32)
    losses: list[float] = []
    num_tokens, slowest_step_s, teacher_s, stopped_by = 0, 0.0, 0.0, "max_steps"
    last_step_predicted_end_s = 0.0
    start = time.perf_counter()

    def budget_clock() -> float:  # the level's own seconds: the shared teacher targets are not on it
        return time.perf_counter() - start - teacher_s

    # The bar counts the budget's seconds (the budget, not a step count, ends a level).
    bar = tqdm(total=round(config.budget_s), desc=f"distil level {task.level}", unit="s", dynamic_ncols=True)
    for step in itertools.count() if config.max_steps is None else range(config.max_steps):
        elapsed = budget_clock()
        # The slowest step so far, not the last, predicts the next: on shared cores a step's time
        # varied by 2x, and the last step's estimate let a level overrun 300 s by 5 s.
        if elapsed + slowest_step_s > config.budget_s:
            stopped_by = "budget"
            break
        last_step_predicted_end_s = elapsed + slowest_step_s
        progress = max(elapsed / config.budget_s, step / config.max_steps if config.max_steps else 0.0)
        for group in optimizer.param_groups:
            group["lr"] = config.learning_rate * learning_rate_factor(step, progress, config.warmup_steps)
        batch = batches[step % len(batches)]
        teacher_s += teacher.prepare(step % len(batches), batch)
        step_start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = scored_logits(model, batch, submodel, corrections)
        loss = teacher.kl(step % len(batches), batch, logits)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        slowest_step_s = max(slowest_step_s, time.perf_counter() - step_start)
        losses.append(loss.item())
        num_tokens += batch.num_scored
        bar.set_postfix(step=len(losses), kl=f"{sum(losses[-10:]) / len(losses[-10:]):.4f}", tokens=num_tokens)
        bar.update(min(round(budget_clock()), bar.total) - bar.n)
    bar.close()
    seconds = budget_clock()
    kl_after = probe_kl(model, teacher, probe, task.submodel, corrections)
    report = LevelReport(task.level, len(losses), num_tokens, seconds, stopped_by, _mean(losses[:10]),
                         _mean(losses[-10:]), kl_before, kl_after, config.train_biases, config.top_k,
                         "bf16" if autocast else "fp32", teacher_s, last_step_predicted_end_s, slowest_step_s)
    return corrections, report


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


# --- all levels, resumable -----------------------------------------------------------------------

def distill_levels(model: TorchLlama, tasks: Sequence[LevelTask], batches: Sequence[TokenBatch], config: DistillConfig,
                   directory: Path, checkpoint_digest: str) -> dict[int, dict[str, Any]]:
    """Distil every level not yet in `directory`'s adapters file, saving after each; returns every
    level's report (earlier runs' included)."""
    if len(batches) < 2:
        raise ValueError("distillation needs at least two calibration batches (one is held aside as a probe)")
    stored = load_adapters(directory, checkpoint_digest) or StoredAdapters(checkpoint_digest)
    planned = sum(num_parameters(level_tensors(task.level, trainable_corrections(
        task.initial, config, model.config.hidden_size)[0])) for task in tasks)
    tqdm.write(check_parameter_budget(planned, num_model_parameters(model), config.max_parameter_fraction))
    teacher, train, probe = Teacher(model, config.top_k), batches[:-1], batches[-1]
    for task in tasks:
        if task.level in stored.reports:
            tqdm.write(f"level {task.level}: distilled already ({_summary(stored.reports[task.level])}), skipped")
            continue
        corrections, report = distill_level(model, task, train, probe, teacher, config)
        stored = stored.with_level(task.level, level_tensors(task.level, corrections), asdict(report))
        save_adapters(directory, stored)
        tqdm.write(f"level {task.level}: {_summary(asdict(report))}; teacher cache {teacher.nbytes / 2**20:.0f} MiB")
    return stored.reports


def _summary(report: dict[str, Any]) -> str:
    return (f"{report['num_steps']} steps, {report['num_tokens']:,} tokens in {report['seconds']:.0f} s "
            f"(stopped by {report['stopped_by']}; teacher targets {report.get('teacher_seconds', 0.0):.0f} s), "
            f"probe KL {report['probe_kl_before']:.4f} -> {report['probe_kl_after']:.4f}")


# --- an elastic checkpoint -----------------------------------------------------------------------

def distill_checkpoint(model: str | None, directory: Path, config: DistillConfig) -> dict[int, dict[str, Any]]:
    """Distil the levels of the elastic checkpoint in `directory` (made from `model` by `engine
    elastify`) into its adapters.safetensors; levels already there are skipped."""
    from engine.elastic.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(directory)  # unfinished levels' terms are the closed-form ones
    spec = checkpoint.spec
    digest = checkpoint_digest(directory)
    stored = load_adapters(directory, digest)
    if stored is not None and all(level.level in stored.reports for level in spec.levels[1:]):
        # Every level is done: skip loading the model and rendering calibration text (minutes).
        for level, report in sorted(stored.reports.items(), reverse=True):
            tqdm.write(f"level {level}: distilled already ({_summary(report)}), skipped")
        return stored.reports
    torch_model = TorchLlama.load(model)
    tasks = [LevelTask(level.level, prefix_submodel(level, checkpoint.ffn_orders, checkpoint.head_orders,
                                                    spec.num_kv_heads), checkpoint.corrections[level.level])
             for level in spec.levels[1:]]
    tokenizer = calibration.default_tokenizer(model)
    conversations = calibration.calibration_sequences(tokenizer, config.num_conversations, config.seq_len)
    batches = calibration_batches(conversations, config.batch_size, config.seed)
    reports = distill_levels(torch_model, tasks, batches, config, directory, digest)
    # A quality table measured before described the closed-form terms, no longer what is served.
    (directory / QUALITY_FILE).unlink(missing_ok=True)
    return reports

