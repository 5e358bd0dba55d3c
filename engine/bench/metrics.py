"""Serving-benchmark metrics from per-request records, named as `vllm bench serve` saves them.

Pure functions over `RequestRecord`s: the HTTP load generator and the simulator both produce
records and share `summarize`, so their results read the same way.

Definitions (vLLM's):
- TTFT: from sending the request to the first chunk with content.
- ITL: the gaps between consecutive content chunks of one request.
- TPOT: (E2EL - TTFT) / (output tokens - 1), for requests with at least 2 output tokens.
- E2EL: from sending the request to its last byte.
- Goodput (DistServe): completed requests per second that meet every SLO given; a request with
  a single output token has no TPOT and meets any TPOT SLO.  `slo_attainment` is the fraction
  of all requests (failed ones included) that meet every SLO.
Statistics are numpy's: `np.percentile` with linear interpolation, `np.std` with ddof=0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Percentiles reported for every latency, beside mean, median and std.
PERCENTILES = (90, 99)
LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One request as the client saw it.  Times are seconds; `*_time_s` are from the benchmark's start.

    A failed request has success=False and an `error`; its timings are whatever was measured
    before it failed and are left out of every statistic.
    """

    prompt_len: int  # prompt tokens (as the dataset counted them)
    output_len: int = 0  # generated tokens (the server's usage when it reports one)
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    e2el_s: float = 0.0
    success: bool = True
    error: str | None = None
    arrival_time_s: float = 0.0  # when the arrival process released it
    start_time_s: float = 0.0  # when it was sent: later than arrival while --max-concurrency holds it back
    # Elastic settings that served it, where the benchmark knows them (in-process replays): the
    # level of each generated token, and the prompt_keep its prompt ran at.
    token_levels: list[int] = field(default_factory=list)
    prompt_keep: float | None = None

    @property
    def tpot_s(self) -> float | None:
        if not self.success or self.ttft_s is None or self.output_len < 2:
            return None
        return (self.e2el_s - self.ttft_s) / (self.output_len - 1)


def latency_stats(name: str, values_s: Sequence[float]) -> dict[str, float | None]:
    """mean/median/std/p90/p99 of `values_s` in milliseconds, keyed `mean_{name}_ms` etc.; None when empty."""
    keys = [f"mean_{name}_ms", f"median_{name}_ms", f"std_{name}_ms", *(f"p{p}_{name}_ms" for p in PERCENTILES)]
    if len(values_s) == 0:
        return dict.fromkeys(keys)
    ms = np.asarray(values_s, dtype=np.float64) * 1000.0
    figures = [np.mean(ms), np.median(ms), np.std(ms), *np.percentile(ms, PERCENTILES)]
    return {key: float(value) for key, value in zip(keys, figures)}


def meets_slos(record: RequestRecord, slo_ttft_ms: float | None, slo_tpot_ms: float | None) -> bool:
    """Whether a request succeeded within every SLO given (None = no SLO on that metric)."""
    if not record.success:
        return False
    if slo_ttft_ms is not None and (record.ttft_s is None or record.ttft_s * 1000.0 > slo_ttft_ms):
        return False
    tpot_s = record.tpot_s
    return slo_tpot_ms is None or tpot_s is None or tpot_s * 1000.0 <= slo_tpot_ms


def goodput(records: Sequence[RequestRecord], duration_s: float, slo_ttft_ms: float | None = None,
            slo_tpot_ms: float | None = None) -> dict[str, float | None]:
    """request_goodput (req/s within every SLO) and slo_attainment (fraction); both None without SLOs."""
    if slo_ttft_ms is None and slo_tpot_ms is None:
        return {"request_goodput": None, "slo_attainment": None}
    num_good = sum(meets_slos(record, slo_ttft_ms, slo_tpot_ms) for record in records)
    return {"request_goodput": num_good / duration_s if duration_s > 0 else 0.0,
            "slo_attainment": num_good / len(records) if records else 0.0}


def summarize(records: Sequence[RequestRecord], duration_s: float, slo_ttft_ms: float | None = None,
              slo_tpot_ms: float | None = None) -> dict[str, Any]:
    """The result of one benchmark run: totals, throughputs, latency statistics, goodput and the
    per-request lists, under the key names of `vllm bench serve`'s saved JSON."""
    done = [record for record in records if record.success]
    total_input = sum(record.prompt_len for record in done)
    total_output = sum(record.output_len for record in done)
    per_s = 1.0 / duration_s if duration_s > 0 else 0.0
    result: dict[str, Any] = {
        "duration": duration_s,
        "completed": len(done),
        "failed": len(records) - len(done),
        "total_input_tokens": total_input,
        "total_output_tokens": total_output,
        "request_throughput": len(done) * per_s,
        "input_throughput": total_input * per_s,
        "output_throughput": total_output * per_s,
        "total_token_throughput": (total_input + total_output) * per_s,
        **goodput(records, duration_s, slo_ttft_ms, slo_tpot_ms),
        "slo_ttft_ms": slo_ttft_ms,
        "slo_tpot_ms": slo_tpot_ms,
    }
    samples = {
        "ttft": [r.ttft_s for r in done if r.ttft_s is not None],
        "tpot": [tpot for r in done if (tpot := r.tpot_s) is not None],
        "itl": [gap for r in done for gap in r.itl_s],
        "e2el": [r.e2el_s for r in done],
    }
    for name in LATENCY_METRICS:
        result.update(latency_stats(name, samples[name]))
    result.update(per_request_lists(records))
    return result


def per_request_lists(records: Sequence[RequestRecord]) -> dict[str, list[Any]]:
    """Every request's figures, in request order (failed ones included, as vLLM saves them)."""
    return {
        "input_lens": [r.prompt_len for r in records],
        "output_lens": [r.output_len if r.success else 0 for r in records],
        "ttfts": [r.ttft_s for r in records],
        "tpots": [r.tpot_s for r in records],
        "itls": [list(r.itl_s) for r in records],
        "latencies": [r.e2el_s for r in records],
        "arrival_times": [r.arrival_time_s for r in records],
        "start_times": [r.start_time_s for r in records],
        "errors": [r.error or "" for r in records],
    }
