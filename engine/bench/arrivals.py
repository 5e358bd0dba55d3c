"""Open-loop arrival times, like `vllm bench serve --request-rate R --burstiness B`.

Inter-arrival gaps are gamma-distributed with shape B and mean 1/R: B = 1 is a Poisson process
(exponential gaps, coefficient of variation 1), B < 1 is burstier, B > 1 more regular (CV = 1/sqrt(B)),
B = inf sends exactly every 1/R s.  R = inf sends everything at time 0.

Like vLLM, the first request waits one gap too, and the times are then rescaled so the last one
lands exactly at N/R: runs with different seeds then take the same time to send everything, which
steadies throughput figures (unscaled, the sum of N gaps is off by about 1/sqrt(N)).
"""

from __future__ import annotations

import math

import numpy as np


def arrival_times(num_requests: int, request_rate: float, burstiness: float = 1.0, seed: int = 0, *,
                  normalize: bool = True) -> list[float]:
    """Seconds from the start at which each of `num_requests` requests arrives, non-decreasing."""
    if request_rate <= 0 or math.isnan(request_rate):
        raise ValueError(f"request_rate must be positive (inf: all at once), got {request_rate}")
    if burstiness <= 0 or math.isnan(burstiness):
        raise ValueError(f"burstiness must be positive, got {burstiness}")
    if num_requests <= 0:
        return []
    if math.isinf(request_rate):
        return [0.0] * num_requests
    gaps = inter_arrival_gaps(num_requests, request_rate, burstiness, np.random.default_rng(seed))
    times = np.cumsum(gaps)
    if normalize and times[-1] > 0:
        times *= (num_requests / request_rate) / times[-1]
    return times.tolist()


def inter_arrival_gaps(num_requests: int, request_rate: float, burstiness: float,
                       rng: np.random.Generator) -> np.ndarray:
    """Gamma(shape=burstiness, scale=1/(rate*burstiness)) gaps: mean 1/rate whatever the shape."""
    if math.isinf(burstiness):
        return np.full(num_requests, 1.0 / request_rate)
    return rng.gamma(shape=burstiness, scale=1.0 / (request_rate * burstiness), size=num_requests)
