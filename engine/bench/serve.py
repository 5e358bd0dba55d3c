"""`engine bench serve`: open-loop load on any OpenAI-compatible server, like `vllm bench serve`.

Requests arrive on their own clock (`arrivals.arrival_times`), whatever the server is doing:
open loop.  `max_concurrency` then holds arrivals back while that many are in flight, as a
gateway in front of the server would; TTFT and E2EL count from sending, not from arrival.

    result = run_benchmark(RunConfig("http://127.0.0.1:8000", RequestOptions(model="m")), requests)

The result is `metrics.summarize`'s dictionary plus what the run was (label, rate, ...) and, where
the server exports Prometheus histograms, its own mean TTFT and E2EL over the same requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any

import httpx
from tqdm import tqdm

from engine.bench.arrivals import arrival_times
from engine.bench.client import RequestOptions, new_client, request_body, send_request
from engine.bench.datasets import SampleRequest
from engine.bench.metrics import RequestRecord, summarize
from engine.bench.server_metrics import scrape, server_latency_means

WARMUP_OUTPUT_LEN = 8


@dataclass(frozen=True)
class RunConfig:
    """The traffic of one run against one server."""

    base_url: str  # e.g. http://127.0.0.1:8000 (no /v1)
    options: RequestOptions
    request_rate: float = math.inf  # requests/s; inf sends everything at once
    burstiness: float = 1.0  # gamma shape of the inter-arrival gaps; 1 = Poisson
    max_concurrency: int | None = None  # requests in flight at most; None = no limit
    seed: int = 0  # of the arrival process
    fresh_connections: bool = False  # a new connection per request
    api_key: str | None = None
    label: str | None = None  # names this system in tables and plots
    show_progress: bool = True

    def __post_init__(self) -> None:
        if not self.request_rate > 0:
            raise ValueError(f"request_rate must be positive (inf: all at once), got {self.request_rate}")
        if not self.burstiness > 0:
            raise ValueError(f"burstiness must be positive, got {self.burstiness}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be positive or None, got {self.max_concurrency}")

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + self.options.endpoint


@dataclass(frozen=True)
class ModelInfo:
    """What GET /v1/models says about the first model a server lists."""

    id: str
    max_model_len: int | None  # None where the server does not say (llama-server)


def fetch_model_info(base_url: str, api_key: str | None = None, timeout_s: float = 30.0) -> ModelInfo:
    """The first model of GET {base_url}/v1/models; raises RuntimeError naming the URL if there is none."""
    url = f"{base_url.rstrip('/')}/v1/models"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(url, headers=headers, timeout=timeout_s)
        response.raise_for_status()
        first = response.json()["data"][0]
    except (httpx.HTTPError, ValueError, KeyError, IndexError) as e:
        raise RuntimeError(f"could not read the first model from {url}: {e}") from e
    max_model_len = first.get("max_model_len")
    return ModelInfo(str(first["id"]), int(max_model_len) if max_model_len else None)


def run_benchmark(config: RunConfig, requests: list[SampleRequest],
                  warmup_request: SampleRequest | None = None) -> dict[str, Any]:
    """Send `requests` as `config` says and summarize them; one warm-up request first when given.

    Raises RuntimeError when the warm-up request fails (wrong URL, model or endpoint): a run
    whose every request would fail measures nothing.
    """
    if warmup_request is not None:
        warm_up(config, warmup_request)
    before = scrape(config.base_url)
    records, duration_s = asyncio.run(_send_all(config, requests))
    after = scrape(config.base_url)
    result = {**describe(config, len(requests)),
              **summarize(records, duration_s, config.options.slo_ttft_ms, config.options.slo_tpot_ms)}
    if before is not None and after is not None:
        result.update(server_latency_means(before, after))
    return result


def run_sweep(config: RunConfig, request_rates: list[float], requests: list[SampleRequest],
              warmup_request: SampleRequest | None = None) -> list[dict[str, Any]]:
    """One run per request rate, on the same requests, in the order given; one warm-up in all."""
    if warmup_request is not None:
        warm_up(config, warmup_request)
    return [run_benchmark(replace(config, request_rate=rate), requests) for rate in request_rates]


def warm_up(config: RunConfig, request: SampleRequest) -> RequestRecord:
    """One short request, unmeasured: loads lazy paths and proves the URL, model and endpoint."""
    short = replace(request, expected_output_len=min(request.expected_output_len, WARMUP_OUTPUT_LEN))
    record = asyncio.run(_send_all(replace(config, show_progress=False), [short]))[0][0]
    if not record.success:
        raise RuntimeError(f"the warm-up request to {config.url} failed: {record.error}")
    return record


def describe(config: RunConfig, num_prompts: int) -> dict[str, Any]:
    """What the run was, as the result records it.  An infinite rate is written "inf" (JSON has no inf)."""
    return {
        "label": config.label or config.options.model,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "base_url": config.base_url,
        "endpoint": config.options.endpoint,
        "model_id": config.options.model,
        "num_prompts": num_prompts,
        "request_rate": "inf" if math.isinf(config.request_rate) else config.request_rate,
        "burstiness": config.burstiness,
        "max_concurrency": config.max_concurrency,
        "ignore_eos": config.options.ignore_eos,
        "fresh_connections": config.fresh_connections,
    }


async def _send_all(config: RunConfig, requests: list[SampleRequest]) -> tuple[list[RequestRecord], float]:
    """Every request at its arrival time, at most `max_concurrency` in flight: the records in
    request order and the seconds from the first arrival slot to the last response."""
    times = arrival_times(len(requests), config.request_rate, config.burstiness, config.seed)
    # asyncio.Semaphore wakes waiters first come, first served: requests are sent in arrival order.
    gate = asyncio.Semaphore(config.max_concurrency) if config.max_concurrency else contextlib.nullcontext()
    progress = tqdm(total=len(requests), disable=not config.show_progress, desc=config.label or "requests")
    async with new_client(config.max_concurrency, config.fresh_connections, config.api_key) as client:
        origin = time.perf_counter()

        async def one(request: SampleRequest, arrival_s: float) -> RequestRecord:
            await asyncio.sleep(max(0.0, origin + arrival_s - time.perf_counter()))
            async with gate:
                record = await send_request(client, config.url, request_body(request, config.options),
                                            request.prompt_len, arrival_s, origin)
            progress.update(1)
            return record

        records = await asyncio.gather(*(one(request, t) for request, t in zip(requests, times)))
        duration_s = time.perf_counter() - origin
    progress.close()
    return list(records), duration_s
