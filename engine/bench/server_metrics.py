"""The server's own view of a run, from its Prometheus /metrics scraped before and after.

Our server and vLLM export the same histograms (prefix `engine:` or `vllm:`):
`*:time_to_first_token_seconds` and `*:e2e_request_latency_seconds`.  The difference of their
`_sum` and `_count` between two scrapes gives the server's mean over exactly the requests in
between, to set beside the client's: the client's figures also hold HTTP, request parsing,
tokenization and SSE delivery, so they should be a little higher, never lower.
"""

from __future__ import annotations

import httpx

METRIC_PREFIXES = ("engine", "vllm")
HISTOGRAMS = {"ttft": "time_to_first_token_seconds", "e2el": "e2e_request_latency_seconds"}


def parse_prometheus(text: str) -> dict[str, float]:
    """The exposition text's samples as {'name{labels}': value}, comments left out."""
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            try:
                samples[key] = float(value)
            except ValueError:
                continue  # a sample with a timestamp or an odd value: not one we read
    return samples


def metric_total(samples: dict[str, float], name: str) -> float:
    """Sum of the samples of `name` over all label sets."""
    return sum(value for key, value in samples.items() if key.split("{", 1)[0] == name)


def scrape(base_url: str, timeout_s: float = 10.0) -> dict[str, float] | None:
    """GET {base_url}/metrics, or None when the server has none (llama-server without --metrics)."""
    try:
        response = httpx.get(f"{base_url}/metrics", timeout=timeout_s)
    except httpx.HTTPError:
        return None
    return parse_prometheus(response.text) if response.status_code == 200 else None


def server_latency_means(before: dict[str, float], after: dict[str, float]) -> dict[str, float | int]:
    """server_mean_ttft_ms, server_mean_e2el_ms and their request counts over the requests finished
    between two scrapes; empty when the server exports neither histogram."""
    for prefix in METRIC_PREFIXES:
        if f"{prefix}:{HISTOGRAMS['ttft']}_count" not in {key.split("{", 1)[0] for key in after}:
            continue
        figures: dict[str, float | int] = {}
        for metric, histogram in HISTOGRAMS.items():
            name = f"{prefix}:{histogram}"
            count = metric_total(after, f"{name}_count") - metric_total(before, f"{name}_count")
            total = metric_total(after, f"{name}_sum") - metric_total(before, f"{name}_sum")
            figures[f"server_num_{metric}"] = int(count)
            if count > 0:
                figures[f"server_mean_{metric}_ms"] = 1000.0 * total / count
        return figures
    return {}
