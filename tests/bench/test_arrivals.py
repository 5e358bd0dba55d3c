"""Arrival processes: rate, burstiness (coefficient of variation) and seeding."""

from __future__ import annotations

import math

import numpy as np
import pytest

from engine.bench.arrivals import arrival_times

NUM_SAMPLES = 20_000


def _gaps(times: list[float]) -> np.ndarray:
    return np.diff(np.concatenate([[0.0], times]))


@pytest.mark.parametrize("rate", [0.5, 4.0, 100.0])
def test_poisson_mean_gap_and_cv(rate: float) -> None:
    gaps = _gaps(arrival_times(NUM_SAMPLES, rate, burstiness=1.0, seed=1, normalize=False))
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.05)  # exponential gaps


@pytest.mark.parametrize("burstiness", [0.25, 0.5, 2.0, 8.0])
def test_gamma_cv_is_one_over_sqrt_burstiness(burstiness: float) -> None:
    gaps = _gaps(arrival_times(NUM_SAMPLES, 2.0, burstiness=burstiness, seed=2, normalize=False))
    assert gaps.mean() == pytest.approx(0.5, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(1 / math.sqrt(burstiness), rel=0.08)


def test_normalized_times_end_at_n_over_rate() -> None:
    times = arrival_times(100, 4.0, seed=3)
    assert times[-1] == pytest.approx(100 / 4.0)
    assert all(later >= earlier for earlier, later in zip(times, times[1:]))
    assert times[0] > 0  # like vLLM, the first request waits one gap too


def test_infinite_burstiness_is_a_fixed_interval() -> None:
    assert arrival_times(4, 2.0, burstiness=math.inf) == pytest.approx([0.5, 1.0, 1.5, 2.0])


def test_infinite_rate_sends_everything_at_once() -> None:
    assert arrival_times(5, math.inf, burstiness=0.3, seed=9) == [0.0] * 5
    assert arrival_times(0, 1.0) == []


def test_seeds_reproduce() -> None:
    assert arrival_times(50, 3.0, 0.7, seed=11) == arrival_times(50, 3.0, 0.7, seed=11)
    assert arrival_times(50, 3.0, 0.7, seed=11) != arrival_times(50, 3.0, 0.7, seed=12)


@pytest.mark.parametrize("rate, burstiness", [(0.0, 1.0), (-1.0, 1.0), (math.nan, 1.0), (1.0, 0.0), (1.0, -2.0)])
def test_rejects_non_positive_parameters(rate: float, burstiness: float) -> None:
    with pytest.raises(ValueError):
        arrival_times(3, rate, burstiness)
