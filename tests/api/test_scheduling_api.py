"""A server running the SLO policy: refusals are HTTP 429 (streaming or not) and counted; SLO
attainment and prefix-cache metrics are exported; the policy flags parse."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import httpx
import pytest

from engine.api.server import add_serve_arguments, engine_config_from_args

from .conftest import ServerProcess, metric, running_server, scrape

PROMPT = "Write a short story about a lighthouse keeper."


@pytest.fixture(scope="module")
def slo_server() -> Iterator[ServerProcess]:
    yield from running_server("--scheduling-policy", "slo", "--slo-ttft-ms", "30000", "--slo-tpot-ms", "1000")


def test_unattainable_ttft_is_refused_with_429_and_counted(slo_server: ServerProcess) -> None:
    # No step takes under 1 ms on this CPU: the target cannot be met even with an empty queue.
    body = {"prompt": PROMPT, "max_tokens": 4, "slo": {"ttft_ms": 1}}
    with httpx.Client(base_url=slo_server.base_url, timeout=60) as http:
        for stream in (False, True):
            response = http.post("/v1/completions", json={**body, "stream": stream})
            assert response.status_code == 429, response.text
            assert response.headers["Retry-After"] == "1"
            error = response.json()["error"]
            assert error["code"] == "slo_ttft_unattainable" and "TTFT target" in error["message"]
        chat = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": PROMPT}],
                                                        "max_tokens": 4, "slo": {"ttft_ms": 1}})
        assert chat.status_code == 429, chat.text
        served = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 8, "ignore_eos": True})
        assert served.status_code == 200 and served.json()["usage"]["completion_tokens"] == 8
        samples = scrape(slo_server.base_url)
    assert metric(samples, "engine:requests_rejected_total", reason="slo_ttft_unattainable") == 3
    assert metric(samples, "engine:slo_attained_total") + metric(samples, "engine:slo_violated_total") == 1
    assert metric(samples, "engine:num_requests_running") == 0


def test_prefix_cache_metrics_count_a_repeated_prompt(slo_server: ServerProcess) -> None:
    prompt = "You are a helpful assistant. " * 20 + "Say hi."
    with httpx.Client(base_url=slo_server.base_url, timeout=60) as http:
        before = scrape(slo_server.base_url)
        for _ in range(2):
            assert http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2}).status_code == 200
        after = scrape(slo_server.base_url)
    queries = metric(after, "engine:prefix_cache_queries_total") - metric(before, "engine:prefix_cache_queries_total")
    hits = metric(after, "engine:prefix_cache_hits_total") - metric(before, "engine:prefix_cache_hits_total")
    assert queries > 200 and hits >= 0.4 * queries  # the second request found the first one's blocks


def parse_serve_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return parser.parse_args(list(argv))


def test_policy_and_prefix_caching_flags_parse() -> None:
    config = engine_config_from_args(parse_serve_args(
        "--scheduling-policy", "mlfq", "--mlfq-num-levels", "5", "--mlfq-starvation-s", "3",
        "--slo-ttft-ms", "2000", "--slo-tpot-ms", "100", "--slo-best-effort", "--no-prefix-caching"))
    assert config.scheduler.policy == "mlfq"
    assert config.scheduler.mlfq.num_levels == 5 and config.scheduler.mlfq.starvation_s == 3
    assert (config.scheduler.slo.ttft_ms, config.scheduler.slo.tpot_ms, config.scheduler.slo.best_effort) == \
        (2000, 100, True)
    assert not config.cache.enable_prefix_caching
    assert engine_config_from_args(parse_serve_args()).cache.enable_prefix_caching
    assert not engine_config_from_args(parse_serve_args("--no-enable-prefix-caching")).cache.enable_prefix_caching


def test_kv_cache_dtype_flag_parses_and_rejects_unknown_values() -> None:
    assert engine_config_from_args(parse_serve_args()).cache.kv_cache_dtype == "auto"
    assert engine_config_from_args(parse_serve_args("--kv-cache-dtype", "int8")).cache.kv_cache_dtype == "int8"
    with pytest.raises(SystemExit):
        parse_serve_args("--kv-cache-dtype", "fp8")
