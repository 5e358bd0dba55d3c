"""Serving metrics: statistics against numpy, totals, goodput and SLO attainment on hand-made records."""

from __future__ import annotations

import numpy as np
import pytest

from engine.bench.metrics import RequestRecord, goodput, latency_stats, meets_slos, summarize


def _record(ttft_s: float, e2el_s: float, output_len: int, prompt_len: int = 10, **kwargs) -> RequestRecord:
    return RequestRecord(prompt_len=prompt_len, output_len=output_len, ttft_s=ttft_s, e2el_s=e2el_s, **kwargs)


def test_latency_stats_match_numpy() -> None:
    values_s = [0.5, 0.01, 0.2, 0.7, 0.03, 1.9, 0.4]
    ms = np.array(values_s) * 1000
    stats = latency_stats("ttft", values_s)
    assert stats == pytest.approx({
        "mean_ttft_ms": ms.mean(), "median_ttft_ms": np.median(ms), "std_ttft_ms": ms.std(),
        "p90_ttft_ms": np.percentile(ms, 90), "p99_ttft_ms": np.percentile(ms, 99)})
    assert stats["p90_ttft_ms"] == pytest.approx(1000 * (0.7 + 0.4 * (1.9 - 0.7)))  # index 5.4 of 7 sorted


def test_latency_stats_of_nothing_are_none() -> None:
    assert set(latency_stats("itl", []).values()) == {None}


def test_tpot_is_decode_time_per_token_after_the_first() -> None:
    assert _record(0.2, 1.2, output_len=11).tpot_s == pytest.approx(0.1)
    assert _record(0.2, 1.2, output_len=1).tpot_s is None
    assert RequestRecord(prompt_len=3, success=False, error="boom", ttft_s=0.1, e2el_s=1.0, output_len=5).tpot_s is None


def test_summarize_totals_throughputs_and_latencies() -> None:
    records = [
        _record(0.1, 1.1, output_len=11, prompt_len=100, itl_s=[0.1] * 10),
        _record(0.3, 2.3, output_len=21, prompt_len=50, itl_s=[0.05, 0.15] * 10),
        _record(0.5, 0.5, output_len=1, prompt_len=7),
        RequestRecord(prompt_len=1000, success=False, error="HTTP 500: oops", e2el_s=0.01),
    ]
    result = summarize(records, duration_s=4.0)
    assert (result["completed"], result["failed"]) == (3, 1)
    assert (result["total_input_tokens"], result["total_output_tokens"]) == (157, 33)
    assert result["request_throughput"] == pytest.approx(3 / 4)
    assert result["input_throughput"] == pytest.approx(157 / 4)
    assert result["output_throughput"] == pytest.approx(33 / 4)
    assert result["total_token_throughput"] == pytest.approx(190 / 4)
    assert result["mean_ttft_ms"] == pytest.approx(300.0)
    assert result["mean_tpot_ms"] == pytest.approx(100.0)  # (100 + 100) / 2: one-token requests have none
    itls_ms = np.array([0.1] * 10 + [0.05, 0.15] * 10) * 1000
    assert result["median_itl_ms"] == pytest.approx(np.median(itls_ms))
    assert result["p99_itl_ms"] == pytest.approx(np.percentile(itls_ms, 99))
    assert result["mean_e2el_ms"] == pytest.approx(1000 * (1.1 + 2.3 + 0.5) / 3)
    assert result["request_goodput"] is None and result["slo_attainment"] is None
    assert result["errors"] == ["", "", "", "HTTP 500: oops"]
    assert result["input_lens"] == [100, 50, 7, 1000]
    assert result["output_lens"] == [11, 21, 1, 0]
    assert result["tpots"] == pytest.approx([0.1, 0.1, None, None])  # type: ignore[arg-type]
    assert len(result["itls"][1]) == 20


def test_goodput_counts_requests_within_every_slo() -> None:
    records = [
        _record(0.100, 1.1, output_len=11),  # TTFT 100 ms, TPOT 100 ms: meets both
        _record(0.250, 1.25, output_len=11),  # TTFT over 200 ms
        _record(0.150, 3.15, output_len=11),  # TPOT 300 ms: over
        _record(0.150, 5.0, output_len=1),  # a single token: no TPOT, meets the TPOT SLO
        RequestRecord(prompt_len=5, success=False, error="x"),  # failed: never good
    ]
    assert [meets_slos(r, 200, 150) for r in records] == [True, False, False, True, False]
    assert goodput(records, 2.0, slo_ttft_ms=200, slo_tpot_ms=150) == {"request_goodput": 1.0, "slo_attainment": 0.4}
    assert goodput(records, 2.0, slo_ttft_ms=200) == {"request_goodput": 1.5, "slo_attainment": 0.6}
    assert goodput(records, 2.0, slo_tpot_ms=150) == {"request_goodput": 1.5, "slo_attainment": 0.6}
    result = summarize(records, 2.0, slo_ttft_ms=200, slo_tpot_ms=150)
    assert (result["request_goodput"], result["slo_attainment"]) == (1.0, 0.4)
    assert (result["slo_ttft_ms"], result["slo_tpot_ms"]) == (200, 150)


def test_slo_boundaries_are_inclusive() -> None:
    record = _record(0.2, 2.2, output_len=11)  # TTFT exactly 200 ms, TPOT exactly 200 ms
    assert meets_slos(record, 200, 200)
    assert not meets_slos(record, 199.9, None) and not meets_slos(record, None, 199.9)


def test_summarize_with_nothing_completed() -> None:
    result = summarize([RequestRecord(prompt_len=5, success=False, error="refused")], duration_s=1.0)
    assert (result["completed"], result["failed"], result["output_throughput"]) == (0, 1, 0.0)
    assert result["mean_ttft_ms"] is None and result["p99_e2el_ms"] is None
