"""The shipped Grafana dashboard against a real Prometheus: Debian's `prometheus` (installed by
`scripts/setup.sh --test-tools`) scrapes a live server every second while a known load runs;
then every PromQL expression of docker/grafana/dashboards/engine.json, evaluated through
Prometheus's HTTP API, returns data, and the request and token counts agree with what was sent."""

from __future__ import annotations

import math
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .conftest import ServerProcess, free_port, running_server
from .test_dashboard import dashboard_exprs

PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(PROMETHEUS is None, reason="Debian's prometheus is not installed here (run "
                                "`bash scripts/setup.sh --test-tools` as root, or `apt-get install prometheus`)")
WINDOW = "1m"  # stands in for Grafana's $__rate_interval
PROMPTS = [f"Question {i}: name a color." for i in range(8)]  # distinct and under one KV block: no cache hits


@pytest.fixture(scope="module")
def engine_server() -> Iterator[ServerProcess]:
    yield from running_server("--slo-ttft-ms", "60000", "--slo-tpot-ms", "5000")


@pytest.fixture(scope="module")
def prometheus(engine_server: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    workdir = Path(tmp_path_factory.mktemp("prometheus"))
    config = workdir / "prometheus.yml"
    target = f"127.0.0.1:{engine_server.port}"
    config.write_text("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n"
                      f"  - job_name: engine\n    static_configs:\n      - targets: ['{target}']\n")
    port = free_port()
    log = open(workdir / "prometheus.log", "wb")
    process = subprocess.Popen([PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
                                f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                               stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(lambda: httpx.get(f"{url}/-/ready", timeout=2).status_code == 200, 60, "prometheus ready")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def _wait(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"waited {timeout_s} s for {what}")


def query(prometheus: str, expr: str) -> list[dict]:
    response = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=10)
    body = response.json()
    assert response.status_code == 200 and body["status"] == "success", (expr, body)
    return body["data"]["result"]


def label_values(prometheus: str, expr: str) -> list[str]:
    """Grafana's templating `label_values(metric, label)`, as Grafana asks Prometheus for it."""
    metric, label = (part.strip() for part in expr.removeprefix("label_values(").removesuffix(")").split(","))
    response = httpx.get(f"{prometheus}/api/v1/label/{label}/values", params={"match[]": metric}, timeout=10)
    assert response.status_code == 200 and response.json()["status"] == "success", (expr, response.text)
    return response.json()["data"]


def scalar(prometheus: str, expr: str) -> float:
    result = query(prometheus, expr)
    return float(result[0]["value"][1]) if result else math.nan


def send_load(base_url: str) -> dict[str, int]:
    """Known traffic: completions (some streamed), chats with an SLO target; returns the counts."""
    sent = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0}
    with httpx.Client(base_url=base_url, timeout=120) as http:
        for i, prompt in enumerate(PROMPTS):
            body = {"prompt": prompt, "max_tokens": 8 + i, "ignore_eos": True, "slo": {"ttft_ms": 60000}}
            if i % 2:
                body.update(stream=True, stream_options={"include_usage": True})
                with http.stream("POST", "/v1/completions", json=body) as response:
                    usage = [line for line in response.iter_lines() if '"usage":{' in line][-1]
                    usage = httpx.Response(200, content=usage.removeprefix("data: ")).json()["usage"]
            else:
                usage = http.post("/v1/completions", json=body).json()["usage"]
            sent["requests"] += 1
            sent["prompt_tokens"] += usage["prompt_tokens"]
            sent["completion_tokens"] += usage["completion_tokens"]
    return sent


def test_every_dashboard_query_returns_data_and_counts_agree(engine_server: ServerProcess, prometheus: str) -> None:
    _wait(lambda: scalar(prometheus, "up") == 1.0, 30, "the first scrape")
    sent = send_load(engine_server.base_url)
    _wait(lambda: scalar(prometheus, "sum(engine:request_success_total)") == sent["requests"], 30,
          "a scrape after the load")
    time.sleep(2)  # a few more samples, so every rate() window holds the whole load
    assert scalar(prometheus, "sum(engine:generation_tokens_total)") == sent["completion_tokens"]
    assert scalar(prometheus, "sum(engine:prompt_tokens_total)") == sent["prompt_tokens"]
    assert scalar(prometheus, 'sum(engine:request_success_total{finished_reason="length"})') == sent["requests"]
    assert scalar(prometheus, "sum(engine:e2e_request_latency_seconds_count)") == sent["requests"]
    assert scalar(prometheus, "sum(engine:slo_attained_total) + sum(engine:slo_violated_total)") == sent["requests"]
    empty = []
    for expr in dashboard_exprs():
        if expr.startswith("label_values("):
            data = label_values(prometheus, expr)
        else:
            data = query(prometheus, expr.replace("$__rate_interval", WINDOW).replace('=~"$model_name"', '=~".*"'))
        if not data:
            empty.append(expr)
    assert not empty, f"dashboard queries without data: {empty}"
    for panel_expr in ("sum(rate(engine:generation_tokens_total[1m]))",
                       "histogram_quantile(0.5, sum by (le) (rate(engine:time_to_first_token_seconds_bucket[1m])))"):
        assert scalar(prometheus, panel_expr) > 0, panel_expr
