"""Distillation on a tiny random Llama: the KL to the full model falls, only the side paths (and
biases when asked) change, the wall-clock budget stops training, and a rerun skips finished levels."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from engine.bench.conversations import Conversation
from engine.elastic.adapters import load_adapters
from engine.elastic.calibration import TokenBatch
from engine.elastic.distill import (
    DistillConfig,
    LevelTask,
    Teacher,
    calibration_batches,
    distill_level,
    distill_levels,
    learning_rate_factor,
)
from engine.elastic.torch_model import BlockCorrection, LayerCorrection, LayerSelection, TorchLlama
from engine.model.arch import LlamaArchConfig
from tests.tiny_llama import random_hf_weights

CONFIG = LlamaArchConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4,
                         num_kv_heads=2, head_dim=8)
ANCHOR = 0


@pytest.fixture(scope="module")
def model() -> TorchLlama:
    weights = random_hf_weights(CONFIG, seed=0)
    # The factory's weights give near-uniform next-token distributions that pruning hardly moves:
    # sharpen the logits and let the blocks' outputs weigh in the residual stream.
    weights["model.norm.weight"] *= 10
    for layer in range(CONFIG.num_layers):
        for name in ("self_attn.o_proj.weight", "mlp.down_proj.weight"):
            weights[f"model.layers.{layer}.{name}"] *= 4
    return TorchLlama(CONFIG, weights)


def task(level: int, ffn_width: int, head_ranks: int) -> LevelTask:
    """Every layer but the anchor keeps a prefix; the closed-form terms are zero biases (the side
    paths start LoRA-style, at zero)."""
    whole = LayerSelection()
    pruned = LayerSelection(torch.arange(ffn_width), torch.arange(head_ranks * CONFIG.num_kv_heads))
    def zero() -> BlockCorrection:
        return BlockCorrection(bias=torch.zeros(CONFIG.hidden_size))

    layers = range(CONFIG.num_layers)
    return LevelTask(level, [whole if layer == ANCHOR else pruned for layer in layers],
                     [None if layer == ANCHOR else LayerCorrection(zero(), zero()) for layer in layers])


def batches(num_sequences: int = 18) -> list[TokenBatch]:
    """Random token sequences of 8 .. 23 tokens as calibration conversations, three a batch."""
    generator = torch.Generator().manual_seed(1)
    lengths = torch.randint(8, 24, (num_sequences,), generator=generator).tolist()
    conversations = [Conversation(torch.randint(1, CONFIG.vocab_size, (n,), generator=generator).tolist()[:4],
                                  torch.randint(1, CONFIG.vocab_size, (n,), generator=generator).tolist()[4:])
                     for n in lengths]
    return calibration_batches(conversations, batch_size=3)


def test_calibration_batches_score_every_token_after_the_first_in_a_shuffled_order() -> None:
    made = batches()
    assert len(made) == 6 and sum(b.input_ids.shape[0] for b in made) == 18
    assert [b.input_ids.shape[1] for b in made] != sorted((b.input_ids.shape[1] for b in made), reverse=True)
    for batch in made:
        lengths = (batch.input_ids != 0).sum(1)
        assert batch.scored.sum(1).tolist() == (lengths - 1).tolist()


def test_answers_only_calibration_batches_score_the_answers_alone() -> None:
    generator = torch.Generator().manual_seed(2)
    prompt_only = Conversation(torch.randint(1, CONFIG.vocab_size, (12,), generator=generator).tolist(), [])
    answered = [Conversation(torch.randint(1, CONFIG.vocab_size, (4,), generator=generator).tolist(),
                             torch.randint(1, CONFIG.vocab_size, (n,), generator=generator).tolist()) for n in (5, 7)]
    made = calibration_batches([prompt_only, *answered], batch_size=1, answers_only=True)
    # The prompt-only conversation scores nothing and is left out; the others score their answers.
    assert sorted(b.num_scored for b in made) == [5, 7]


def test_learning_rate_warms_up_then_decays_with_the_budget() -> None:
    assert learning_rate_factor(0, 0.0, warmup_steps=4) == pytest.approx(0.25)
    assert learning_rate_factor(10, 0.0, warmup_steps=4) == pytest.approx(1.0)
    assert learning_rate_factor(10, 0.5, warmup_steps=4) == pytest.approx(0.5)
    assert learning_rate_factor(10, 1.2, warmup_steps=4) == pytest.approx(0.0)


@pytest.mark.parametrize("top_k", [16, None])
def test_distilling_lowers_the_kl_and_trains_only_the_terms(model: TorchLlama, top_k: int | None) -> None:
    made = batches()
    weights_before = {name: w.clone() for name, w in model.weights.items()}
    level = task(60, ffn_width=24, head_ranks=1)
    config = DistillConfig(budget_s=60, max_steps=60, learning_rate=1e-2, batch_size=3, top_k=top_k)
    corrections, report = distill_level(model, level, made[:-1], made[-1], Teacher(model, top_k), config)
    assert report.stopped_by == "max_steps" and report.num_steps == 60
    assert report.num_tokens == sum(made[i % (len(made) - 1)].num_scored for i in range(60))
    assert report.last_loss < 0.7 * report.first_loss
    assert report.probe_kl_after < 0.8 * report.probe_kl_before  # on the batch it never trained on
    assert all(torch.equal(w, weights_before[name]) for name, w in model.weights.items())
    trained = corrections[1].ffn
    assert trained.lora_b.abs().sum() > 0 and trained.bias.abs().sum() > 0
    assert level.initial[1].ffn.bias.abs().sum() == 0  # the closed-form terms handed in are not touched


def test_frozen_biases_stay_at_their_closed_form(model: TorchLlama) -> None:
    made, level = batches(), task(60, ffn_width=24, head_ranks=1)
    config = DistillConfig(budget_s=60, max_steps=5, learning_rate=1e-2, train_biases=False)
    corrections, _ = distill_level(model, level, made[:-1], made[-1], Teacher(model, 16), config)
    assert torch.equal(corrections[1].attn.bias, level.initial[1].attn.bias)
    assert corrections[1].attn.lora_b.abs().sum() > 0


def test_the_wall_clock_budget_stops_training(model: TorchLlama) -> None:
    made = batches()
    config = DistillConfig(budget_s=0.5)  # by default no step cap: the budget alone ends a level
    assert config.max_steps is None
    _, report = distill_level(model, task(60, 24, 1), made[:-1], made[-1], Teacher(model, 16), config)
    assert report.stopped_by == "budget" and report.num_steps > 0
    # No step started that the slowest step before it said would end past the budget; and training
    # stopped because the next one would have.  (A wall-clock bound on `seconds` failed in a slow
    # suite run: one step slower than every step before it overran by 0.08 s.  The rule, not the
    # machine's speed, is what is asserted.)
    assert 0 < report.last_step_predicted_end_s <= config.budget_s
    assert report.seconds + report.slowest_step_s > config.budget_s


@pytest.mark.parametrize("bad", [{"max_steps": 0}, {"budget_s": 0}, {"batch_size": 0}, {"seq_len": 8}])
def test_bad_distillation_settings_are_refused(bad: dict) -> None:
    with pytest.raises(ValueError):
        DistillConfig(**bad)


def test_teacher_targets_are_shared_by_the_levels_and_kept_off_their_budgets(model: TorchLlama) -> None:
    made, teacher = batches(), Teacher(model, 16)
    config = DistillConfig(budget_s=60, max_steps=4)
    _, first = distill_level(model, task(80, 48, 2), made[:-1], made[-1], teacher, config)
    _, second = distill_level(model, task(60, 24, 1), made[:-1], made[-1], teacher, config)
    assert first.teacher_seconds > 0 and second.teacher_seconds == 0.0  # the same 4 batches: kept
    # The budget clock stops while the teacher runs: a teacher slower than the whole budget on
    # every batch still leaves the level its steps.  (A wall-clock bound on `seconds` failed once in
    # a loaded CI run: one step stalled 0.4 s, so the structure, not the time, is what is asserted.)
    budgeted = DistillConfig(budget_s=1.0, max_steps=6)
    _, report = distill_level(model, task(60, 24, 1), made[:2], made[-1], SlowTeacher(model, 16), budgeted)
    assert report.teacher_seconds >= 2 * SlowTeacher.DELAY_S > budgeted.budget_s
    assert (report.num_steps, report.stopped_by) == (6, "max_steps")  # counted, it would stop after 1


class SlowTeacher(Teacher):
    """A teacher whose targets take longer than a whole level's budget."""

    DELAY_S = 1.2

    def prepare(self, key: int, batch: TokenBatch) -> float:
        fresh = self.top_k is not None and key not in self._targets
        taken = super().prepare(key, batch)
        if fresh:
            time.sleep(self.DELAY_S)
            taken += self.DELAY_S
        return taken


def test_levels_are_saved_and_a_rerun_skips_them(model: TorchLlama, tmp_path: Path, capsys) -> None:
    made = batches()
    tasks = [task(80, 48, 2), task(60, 24, 1)]
    config = DistillConfig(budget_s=30, max_steps=4, max_parameter_fraction=1.0)  # a tiny model's terms weigh more
    reports = distill_levels(model, tasks, made, config, tmp_path, checkpoint_digest="tiny")
    assert sorted(reports) == [60, 80] and reports[60]["num_steps"] == 4
    stored = load_adapters(tmp_path, "tiny")
    assert stored is not None and "levels.80.layers.1.attn.lora_a" in stored.tensors
    assert not any(".layers.0." in name for name in stored.tensors)  # the anchor has no terms
    assert "of the model's" in capsys.readouterr().out  # the parameter budget line
    mtime = (tmp_path / "adapters.safetensors").stat().st_mtime_ns
    again = distill_levels(model, tasks, made, config, tmp_path, checkpoint_digest="tiny")
    assert again == reports and (tmp_path / "adapters.safetensors").stat().st_mtime_ns == mtime
    assert "distilled already" in capsys.readouterr().out


def test_adapters_are_keyed_by_the_checkpoint_they_were_distilled_from(tmp_path: Path) -> None:
    from engine.elastic.checkpoint import checkpoint_digest

    (tmp_path / "spec.json").write_text("{}")
    (tmp_path / "elastic.safetensors").write_bytes(b"closed-form terms")
    before = checkpoint_digest(tmp_path)
    (tmp_path / "adapters.safetensors").write_bytes(b"distilled")  # not part of what they depend on
    assert checkpoint_digest(tmp_path) == before
    (tmp_path / "elastic.safetensors").write_bytes(b"closed-form terms, refitted")
    assert checkpoint_digest(tmp_path) != before


def test_a_finished_checkpoint_is_not_distilled_again(tmp_path: Path) -> None:
    from engine.elastic.adapters import StoredAdapters, level_tensors, save_adapters
    from engine.elastic.checkpoint import ElasticCheckpoint, checkpoint_digest, save_checkpoint
    from engine.elastic.distill import distill_checkpoint
    from engine.elastic.spec import ElasticLevel, ElasticSpec

    layers = CONFIG.num_layers
    spec = ElasticSpec("tiny", layers, CONFIG.hidden_size, CONFIG.intermediate_size, CONFIG.num_heads,
                       CONFIG.num_kv_heads, CONFIG.head_dim, CONFIG.vocab_size, anchor_layers=(ANCHOR,),
                       levels=(ElasticLevel(100, (64,) * layers, (2,) * layers),
                               ElasticLevel(50, (64, 32, 32), (2, 1, 1))))
    orders = (torch.arange(64).repeat(layers, 1), torch.arange(4).repeat(layers, 1))
    save_checkpoint(tmp_path, ElasticCheckpoint(spec, *orders, {50: task(50, 32, 1).initial}))
    stored = StoredAdapters(checkpoint_digest(tmp_path)).with_level(50, level_tensors(50, task(50, 32, 1).initial),
                                                                     {"num_steps": 7, "num_tokens": 1, "seconds": 1.0,
                                                                      "stopped_by": "budget", "probe_kl_before": 1.0,
                                                                      "probe_kl_after": 0.5})
    save_adapters(tmp_path, stored)
    # The model path does not exist: anything beyond reading the checkpoint would raise.
    reports = distill_checkpoint(str(tmp_path / "no-such-model.gguf"), tmp_path, DistillConfig())
    assert reports[50]["num_steps"] == 7
