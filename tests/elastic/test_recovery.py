"""The closed-form correction recovers an exactly low-rank affine residual."""

from __future__ import annotations

import torch

from engine.elastic.recovery import RecoveryConfig, _Stats, fit_correction


def test_reduced_rank_ridge_recovers_a_low_rank_affine_map() -> None:
    generator = torch.Generator().manual_seed(0)
    hidden, rank, n = 32, 3, 4000
    a, b = torch.randn(rank, hidden, generator=generator), torch.randn(hidden, rank, generator=generator)
    bias = torch.randn(hidden, generator=generator)
    x = torch.randn(n, hidden, generator=generator) + 0.5
    t = (x @ a.T) @ b.T + bias
    stats = _Stats.empty(hidden)
    stats.add(x[:2000], t[:2000])
    stats.add(x[2000:], t[2000:])  # statistics accumulate over batches
    correction = fit_correction(stats, RecoveryConfig(rank=rank, ridge=1e-8))
    assert correction.lora_a.shape == (rank, hidden) and correction.lora_b.shape == (hidden, rank)
    assert torch.allclose(correction.apply(x, torch.zeros_like(t)), t, atol=1e-3)


def test_bias_only_is_the_mean_residual() -> None:
    x, t = torch.randn(100, 8), torch.randn(100, 8)
    stats = _Stats.empty(8)
    stats.add(x, t)
    correction = fit_correction(stats, RecoveryConfig(rank=0))
    assert correction.lora_a is None and torch.allclose(correction.bias, t.mean(0), atol=1e-6)
