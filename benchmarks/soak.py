"""Soak: thousands of mixed, hostile requests against a live server, per scheduling policy, then
the checks of engine/bench/soak.py (zero 5xx, nothing lost, idle afterwards with the KV
invariants held, no memory, descriptor or thread growth).

Each policy gets its own server (a KV budget small enough to force preemptions, invariants
checked at every idle moment); its capacity is measured first (a closed loop of the same mix),
then num_requests / len(policies) requests arrive as a Poisson process at that rate.  Prints a
table, writes benchmarks/results/soak.md and a PNG of the servers' memory, descriptors and
threads over time.

    .venv/bin/python benchmarks/soak.py                                          # 2,000 requests over four policies
    .venv/bin/python benchmarks/soak.py --num-requests 8000 --output soak_long   # 2,000 a policy (~45 min)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import httpx
from tqdm import tqdm

from engine.allocator import allocator_in_use
from engine.bench.datasets import first_exchange, load_sharegpt
from engine.bench.soak import SoakConfig, SoakReport, plan_requests, run_soak
from peers.llama_server import ServerProcess, free_port
from peers.machine import machine, machine_lines
from peers.our_server import REPO_ROOT

RESULTS = Path(__file__).parent / "results"
LOAD = 1.0  # the Poisson rate as a multiple of the measured capacity
POLICY_FLAGS = {"fcfs": [], "priority": [], "mlfq": [],
                "slo": ["--slo-ttft-ms", "4000", "--slo-tpot-ms", "250", "--slo-best-effort"]}


def sharegpt_prompts(count: int = 400, max_chars: int = 600) -> list[str]:
    prompts = []
    for record in load_sharegpt():
        exchange = first_exchange(record)
        if exchange and len(exchange[0]) <= max_chars:
            prompts.append(exchange[0])
        if len(prompts) == count:
            return prompts
    return prompts


def soak_server(policy: str, kv_gib: float, log_file: Path) -> ServerProcess:
    port = free_port()
    command = [sys.executable, "-m", "engine.api.server", "--port", str(port), "--scheduling-policy", policy,
               "--kv-cache-memory", str(kv_gib), "--max-model-len", "1024", "--check-invariants",
               "--disable-log-stats", "--uvicorn-log-level", "warning", *POLICY_FLAGS[policy]]
    return ServerProcess(command, port, log_file, cwd=REPO_ROOT)


async def measure_capacity(url: str, config: SoakConfig, prompts: list[str], num: int = 24,
                           concurrency: int = 8) -> float:
    """Requests a second the server completes, closed loop over the same mix (no hostile share)."""
    calm = replace(config, num_requests=num, disconnect_share=0.0, malformed_share=0.0, rate=1e6, seed=config.seed + 1)
    planned = plan_requests(calm, prompts)
    semaphore = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        async def one(request) -> None:
            async with semaphore:
                body = {**request.body, "stream": False}
                (await client.post(request.path, json=body)).raise_for_status()

        start = time.monotonic()
        await asyncio.gather(*(one(r) for r in planned))
    return num / (time.monotonic() - start)


def run_policy(policy: str, config: SoakConfig, prompts: list[str], kv_gib: float,
               load: float) -> tuple[float, str, SoakReport]:
    """(capacity, the server's malloc, the soak's report)."""
    log_file = RESULTS / f"soak_{policy}.log"
    with soak_server(policy, kv_gib, log_file) as server:
        malloc = allocator_in_use(server.pid)  # engine/allocator.py: tcmalloc where installed
        capacity = asyncio.run(measure_capacity(server.url, config, prompts))
        config = replace(config, rate=capacity * load)
        planned = plan_requests(config, prompts)
        with tqdm(total=len(planned), desc=f"soak {policy} @ {config.rate:.2f} req/s", unit="req") as bar:
            report = asyncio.run(run_soak(server.url, server.pid, planned, progress=bar))
    log_file.unlink(missing_ok=True)  # kept only while it runs: a benchmark dump is not committed
    return capacity, malloc, report


def results_table(summaries: dict[str, dict], config: SoakConfig, kv_gib: float) -> list[str]:
    """Markdown lines of the soak's table, from the per-policy summaries written to the JSON."""
    lines = ["# Soak (`benchmarks/soak.py`)", "", *[f"- {line}" for line in machine_lines(machine())],
             f"- {sum(s['requests'] for s in summaries.values())} requests in all, "
             f"KV cache {kv_gib} GiB (forces preemptions), n <= {config.max_n}, max_tokens <= {config.max_tokens}, "
             f"{config.disconnect_share:.0%} disconnects, {config.malformed_share:.0%} malformed", "",
             "| policy | malloc | capacity req/s | rate req/s | requests | statuses | disconnected | malformed "
             "| preemptions | RSS MB q2 -> q4 | fds idle before, after | threads idle before, after | holds |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for policy, s in summaries.items():
        statuses = " ".join(f"{k}:{v}" for k, v in s["statuses"].items())
        lines.append(f"| {policy} | {s['malloc']} | {s['capacity']:.2f} | {s['capacity'] * LOAD:.2f} | "
                     f"{s['requests']} | {statuses} | {s['disconnected']} | {s['malformed']} | "
                     f"{s['preemptions']:.0f} | {s['rss_mb_q2']} -> {s['rss_mb_q4']} | "
                     f"{tuple(s['fds_idle_before_after'])} | {tuple(s['threads_idle_before_after'])} | "
                     f"{'yes' if not s['failures'] else '; '.join(s['failures'])} |")
    return lines


def plot(rows: dict[str, tuple[float, str, SoakReport]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for policy, (_, _, report) in rows.items():
        t = [s.t for s in report.samples]
        axes[0].plot(t, [s.rss_bytes / 2**20 for s in report.samples], label=policy)
        axes[1].plot(t, [s.fds for s in report.samples], label=policy)
        axes[2].plot(t, [s.threads for s in report.samples], label=policy)
    for axis, title in zip(axes, ("resident memory (MB)", "open file descriptors", "threads")):
        axis.set_title(title)
        axis.set_xlabel("seconds into the soak")
        axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-requests", type=int, default=2000, help="in all, split evenly over the policies")
    parser.add_argument("--policies", default=",".join(POLICY_FLAGS))
    parser.add_argument("--kv-cache-memory", type=float, default=0.04, help="GiB: small, so preemptions happen")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="soak", help="results file names under benchmarks/results/")
    args = parser.parse_args()
    policies = args.policies.split(",")
    config = SoakConfig(num_requests=args.num_requests // len(policies), seed=args.seed)
    prompts = sharegpt_prompts()
    rows = {policy: run_policy(policy, config, prompts, args.kv_cache_memory, LOAD) for policy in policies}
    summaries = {p: {"capacity": c, "malloc": m, **r.summary()} for p, (c, m, r) in rows.items()}
    (RESULTS / f"{args.output}.json").write_text(json.dumps(summaries, indent=1))
    lines = results_table(summaries, config, args.kv_cache_memory)
    (RESULTS / f"{args.output}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(rows, RESULTS / f"{args.output}.png")
    if any(report.failures for _, _, report in rows.values()):
        raise SystemExit("soak: a check failed (see the table)")


if __name__ == "__main__":
    main()
