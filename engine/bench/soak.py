"""A soak: hours' worth of mixed, hostile traffic against one live server, then its checks.

Traffic (seeded): Poisson arrivals at a given rate; completions and chat, streaming or not, n up
to 4, random max_tokens, ShareGPT prompts; a share of clients that disconnect at a random moment;
a share of malformed or out-of-range bodies.  What must hold (`SoakReport.failures`):

  - zero 5xx, and no request lost: every request a client did not abandon ends with a complete
    response (a finish_reason for each choice, or for a stream a final chunk and [DONE]); every
    malformed one gets a 4xx with OpenAI's error body;
  - when the load stops the server is idle: nothing running or waiting, no KV in use, and (with
    `engine serve --check-invariants`) the block pool's invariants held at every idle moment;
  - no growth: resident memory in the last quarter of the run within 5% of the second quarter's
    (long runs: `check_memory`), and the server idle at the end holds no more file descriptors
    or threads than idle before the load.

The server's resident memory, descriptors and threads are sampled from /proc (its pid is given).
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from engine.bench.server_metrics import metric_total, parse_prometheus

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"


@dataclass(frozen=True)
class SoakConfig:
    num_requests: int = 2000
    rate: float = 1.0  # requests per second, Poisson
    max_n: int = 4
    max_tokens: int = 96  # drawn uniformly from 1 .. this
    disconnect_share: float = 0.10
    malformed_share: float = 0.05
    stream_share: float = 0.5
    chat_share: float = 0.5
    seed: int = 0


@dataclass(frozen=True)
class PlannedRequest:
    index: int
    send_at: float  # seconds from the start
    path: str
    body: dict[str, Any] | bytes  # bytes: sent as is (malformed)
    kind: str  # "ok", "disconnect" or "malformed"
    disconnect_after_s: float = 0.0


@dataclass
class Outcome:
    kind: str
    status: int | None = None
    complete: bool = False  # a finish_reason for every choice (or the stream's end)
    error: str | None = None


MALFORMED_BODIES: tuple[tuple[str, bytes | dict[str, Any]], ...] = (
    (COMPLETIONS, b"{not json"),
    (COMPLETIONS, b"[1, 2, 3]"),
    (COMPLETIONS, {"prompt": "Hi", "max_tokens": -5}),
    (COMPLETIONS, {"prompt": "Hi", "temperature": "hot"}),
    (COMPLETIONS, {"prompt": [10 ** 9], "max_tokens": 4}),
    (COMPLETIONS, {"prompt": "Hi", "n": 10 ** 6}),
    (COMPLETIONS, {"prompt": "Hi", "logprobs": 99}),
    (CHAT, {"messages": []}),
    (CHAT, {"messages": [{"role": "wizard", "content": "Hi"}]}),
    (CHAT, {"messages": [{"role": "user", "content": "Hi"}], "top_p": 0}),
    (CHAT, {"messages": [{"role": "user", "content": "Hi"}], "elastic": {"level": 7}}),
    (COMPLETIONS, {"prompt": "Hi", "max_tokens": 10 ** 7}),
)


def plan_requests(config: SoakConfig, prompts: Sequence[str]) -> list[PlannedRequest]:
    rng = random.Random(config.seed)
    planned, clock = [], 0.0
    for index in range(config.num_requests):
        clock += rng.expovariate(config.rate)
        roll = rng.random()
        if roll < config.malformed_share:
            path, body = MALFORMED_BODIES[rng.randrange(len(MALFORMED_BODIES))]
            planned.append(PlannedRequest(index, clock, path, body, "malformed"))
            continue
        kind = "disconnect" if roll < config.malformed_share + config.disconnect_share else "ok"
        path = CHAT if rng.random() < config.chat_share else COMPLETIONS
        prompt = prompts[rng.randrange(len(prompts))]
        body: dict[str, Any] = {"max_tokens": rng.randint(1, config.max_tokens), "n": rng.randint(1, config.max_n),
                                "temperature": rng.choice([0.0, 0.8]), "seed": rng.randrange(1000),
                                "stream": rng.random() < config.stream_share}
        body["messages" if path == CHAT else "prompt"] = ([{"role": "user", "content": prompt}] if path == CHAT
                                                          else prompt)
        planned.append(PlannedRequest(index, clock, path, body, kind, rng.uniform(0.05, 3.0)))
    return planned


async def send(client: httpx.AsyncClient, request: PlannedRequest) -> Outcome:
    outcome = Outcome(request.kind)
    try:
        work = _exchange(client, request, outcome)
        if request.kind == "disconnect":
            await asyncio.wait_for(work, request.disconnect_after_s)  # cancelled mid-way: the client goes
        else:
            await work
    except TimeoutError:
        outcome.complete = True  # abandoned on purpose; whatever it got is fine
    except httpx.HTTPError as e:
        outcome.error = f"{type(e).__name__}: {e}"
    return outcome


async def _exchange(client: httpx.AsyncClient, request: PlannedRequest, outcome: Outcome) -> None:
    content = request.body if isinstance(request.body, bytes) else json.dumps(request.body).encode()
    headers = {"content-type": "application/json"}
    streaming = isinstance(request.body, dict) and request.body.get("stream", False)
    async with client.stream("POST", request.path, content=content, headers=headers) as response:
        outcome.status = response.status_code
        if response.status_code != 200 or not streaming:
            body = await response.aread()
            outcome.complete = _complete_body(response.status_code, body, request)
            return
        finished, done = set(), False
        async for line in response.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                event = json.loads(line[6:])
                if "error" in event:
                    outcome.error = event["error"].get("code") or event["error"]["message"]
                finished |= {c["index"] for c in event.get("choices", []) if c.get("finish_reason")}
        outcome.complete = done and outcome.error is None and len(finished) == request.body.get("n", 1)


def _complete_body(status: int, body: bytes, request: PlannedRequest) -> bool:
    try:
        data = json.loads(body)
    except json.JSONDecodeError:
        return False
    if status != 200:
        return set(data.get("error", {})) >= {"message", "type", "param", "code"}
    choices = data.get("choices", [])
    return len(choices) == request.body.get("n", 1) and all(c.get("finish_reason") for c in choices)


@dataclass
class ProcessSample:
    t: float
    rss_bytes: int
    fds: int
    threads: int


def sample_process(pid: int, t: float) -> ProcessSample:
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    rss = int(fields["VmRSS"].split()[0]) * 1024
    return ProcessSample(t, rss, len(list(Path(f"/proc/{pid}/fd").iterdir())), int(fields["Threads"]))


@dataclass
class SoakReport:
    outcomes: list[Outcome]
    samples: list[ProcessSample]  # during the load
    idle_before: ProcessSample  # the server idle before the load, and after it (clients gone)
    idle_after: ProcessSample
    final_metrics: dict[str, float]
    duration_s: float
    failures: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        statuses = Counter(o.status for o in self.outcomes)
        return {"requests": len(self.outcomes), "duration_s": round(self.duration_s, 1),
                "statuses": {str(k): v for k, v in sorted(statuses.items(), key=lambda kv: str(kv[0]))},
                "disconnected": sum(o.kind == "disconnect" for o in self.outcomes),
                "malformed": sum(o.kind == "malformed" for o in self.outcomes),
                "preemptions": metric_total(self.final_metrics, "engine:num_preemptions_total"),
                "rss_mb_q2": round(_quarter_rss(self.samples, 1) / 2**20, 1),
                "rss_mb_q4": round(_quarter_rss(self.samples, 3) / 2**20, 1),
                "fds_idle_before_after": (self.idle_before.fds, self.idle_after.fds),
                "threads_idle_before_after": (self.idle_before.threads, self.idle_after.threads),
                "failures": self.failures}


def _quarter_rss(samples: Sequence[ProcessSample], quarter: int) -> float:
    if not samples:
        return 0.0
    end = samples[-1].t
    chosen = [s.rss_bytes for s in samples if quarter * end / 4 <= s.t <= (quarter + 1) * end / 4]
    return statistics.median(chosen) if chosen else 0.0


async def run_soak(base_url: str, pid: int, planned: Sequence[PlannedRequest], *, sample_every_s: float = 1.0,
                   progress: Any = None, check_memory: bool = True) -> SoakReport:
    """Send the planned requests on time, sampling the server process; then check what must hold.
    The server must be idle (no client connected) when this starts."""
    samples: list[ProcessSample] = []
    idle_before = sample_process(pid, 0.0)
    start = time.monotonic()
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits) as client:
        sampler = asyncio.create_task(_sample_loop(pid, start, samples, sample_every_s))
        tasks = []
        for request in planned:
            delay = request.send_at - (time.monotonic() - start)
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(send(client, request))
            if progress is not None:
                task.add_done_callback(lambda _: progress.update(1))
            tasks.append(task)
        outcomes = list(await asyncio.gather(*tasks))
        final = await _idle_metrics(client)
        sampler.cancel()
    duration = time.monotonic() - start
    await asyncio.sleep(1.0)  # the server closes the client's connections
    report = SoakReport(outcomes, samples, idle_before, sample_process(pid, duration), final, duration)
    report.failures = check(report, check_memory)
    return report


async def _sample_loop(pid: int, start: float, samples: list[ProcessSample], every_s: float) -> None:
    while True:
        samples.append(sample_process(pid, time.monotonic() - start))
        await asyncio.sleep(every_s)


async def _idle_metrics(client: httpx.AsyncClient, timeout_s: float = 30.0) -> dict[str, float]:
    """/metrics once the server has let go of everything (aborts arrive a moment after a disconnect)."""
    deadline = time.monotonic() + timeout_s
    while True:
        metrics = parse_prometheus((await client.get("/metrics")).text)
        busy = sum(metric_total(metrics, f"engine:num_requests_{state}") for state in ("running", "waiting"))
        if busy == 0 or time.monotonic() > deadline:
            return metrics
        await asyncio.sleep(0.2)


def check(report: SoakReport, check_memory: bool = True) -> list[str]:
    failures = []
    server_errors = [o for o in report.outcomes if o.status is not None and o.status >= 500]
    if server_errors:
        failures.append(f"{len(server_errors)} 5xx responses")
    lost = [o for o in report.outcomes if o.kind == "ok" and not (o.status == 200 and o.complete)]
    if lost:
        failures.append(f"{len(lost)} requests without a complete response, e.g. {lost[0]}")
    refused = [o for o in report.outcomes if o.kind == "malformed" and not (o.status and 400 <= o.status < 500
                                                                           and o.complete)]
    if refused:
        failures.append(f"{len(refused)} malformed requests not answered with a 4xx error body, e.g. {refused[0]}")
    metrics = report.final_metrics
    for name in ("engine:num_requests_running", "engine:num_requests_waiting", "engine:kv_cache_usage_perc"):
        if metric_total(metrics, name) != 0.0:
            failures.append(f"after the load {name} = {metric_total(metrics, name)}")
    if metric_total(metrics, "engine:invariant_violations_total") > 0:
        failures.append("the block pool's invariants failed at an idle moment (see the server log)")
    before, after = report.idle_before, report.idle_after
    if after.fds > before.fds:
        failures.append(f"file descriptors grew: {before.fds} idle before the load, {after.fds} after")
    if after.threads > before.threads:
        failures.append(f"threads grew: {before.threads} idle before the load, {after.threads} after")
    if check_memory:
        q2, q4 = _quarter_rss(report.samples, 1), _quarter_rss(report.samples, 3)
        if q4 > 1.05 * q2:
            failures.append(f"resident memory grew: {q2 / 2**20:.1f} MB in the second quarter, "
                            f"{q4 / 2**20:.1f} in the last")
    return failures
