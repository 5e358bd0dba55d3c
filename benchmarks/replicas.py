"""Two engine replicas on Ray Serve against one server, same machine, same ShareGPT requests.

    .venv/bin/python benchmarks/replicas.py                      # 128 prompts, 128 tokens, 64 streams, 3 rounds
    .venv/bin/python benchmarks/replicas.py --num-prompts 16 --repeats 1   # quick

1. one `engine serve` (every core to its one engine, no Ray);
2. `engine serve --replicas 1`: Ray Serve's proxy, our router (engine/replicas/), one engine;
3. `engine serve --replicas 2`: the same with two engines of half the cores each.

Both are driven exactly like benchmarks/serve_throughput.py (streaming /v1/completions, raw
ShareGPT prompts, EOS ignored, at most --concurrency in flight).  The acceptance point of the
scale-out issue: two replicas' output tokens/s at least one replica's.  Throughput is what each
system serves when loaded, so the default load gives each of two replicas a full decode batch
(64 streams, 32 a replica): at 32 streams two replicas ran 16 rows a step each against one
replica's 32, and a step's cost grows far less than its rows, so the comparison then measured
batch size as much as replicas (benchmarks/README.md, "Replicas on Ray Serve").  After the run, each
replica's share of the requests is read from the router's /metrics (per-replica labels), and the
CPU seconds every process on the machine used while a system was driven are grouped by kind.
The systems run in turn, `--repeats` rounds (one system's figure moved 20-40% between runs here),
and the ratio is taken within each round and its median reported.
Writes benchmarks/results/<output>.json, .md and .png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

import httpx
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from engine.bench.datasets import sample_sharegpt  # noqa: E402
from engine.model.loader import default_model_path, load_tokenizer, resolve_model  # noqa: E402
from peers.llama_server import ServerProcess, free_port  # noqa: E402
from peers.machine import machine, machine_lines  # noqa: E402
from serve_throughput import SystemResult, drive_server  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS = REPO_ROOT / "benchmarks" / "results"
MIN_TWO_OVER_ONE = 1.0  # the point: two replicas are not slower than one server
SYSTEMS = {"one server": 0, "one replica": 1, "two replicas": 2}  # name -> replicas (0: no Ray)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-prompts", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="replicas")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of every system in turn")
    parser.add_argument("--systems", default=",".join(SYSTEMS),
                        help=f"which of {', '.join(SYSTEMS)} to run (comma-separated; the ratios need their pair)")
    return parser.parse_args()


def cpu_seconds_by_process() -> dict[int, tuple[str, float]]:
    """Every process's CPU seconds so far (user + system) and what it is: Ray names its workers
    `ray::<actor class>`, the rest go by their program."""
    ticks = os.sysconf("SC_CLK_TCK")
    seen = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            command = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue  # gone meanwhile
        fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        seen[int(entry)] = (_process_kind(command), (int(fields[11]) + int(fields[12])) / ticks)
    return seen


def _process_kind(command: list[bytes]) -> str:
    first = command[0].decode(errors="replace") if command and command[0] else "?"
    if first.startswith("ray::"):
        return first.split(":")[-1].split()[0] if "ServeReplica" in first else first.split()[0]
    words = [word.decode(errors="replace") for word in command if word]
    if "engine.cli" in words:
        return "engine serve"
    if Path(first).name.startswith("python") and len(words) > 1:  # the script or -m module it runs
        return Path(words[2] if words[1] == "-m" and len(words) > 2 else words[1]).name
    return Path(first).name


def cpu_used_between(before: dict, after: dict) -> dict[str, float]:
    """CPU seconds each kind of process used between two readings (processes new since count whole)."""
    used: dict[str, float] = {}
    for pid, (kind, seconds) in after.items():
        delta = seconds - before.get(pid, (kind, 0.0))[1]
        if delta > 0.05:
            used[kind] = used.get(kind, 0.0) + delta
    return dict(sorted(used.items(), key=lambda item: -item[1]))


def server(replicas: int, log_file: Path) -> ServerProcess:
    port = free_port()
    command = [sys.executable, "-m", "engine.cli", "serve", "--port", str(port), "--disable-log-stats",
               "--uvicorn-log-level", "warning"]
    if replicas:
        command += ["--replicas", str(replicas)]
    return ServerProcess(command, port, log_file, cwd=REPO_ROOT)


def requests_per_replica(base_url: str) -> dict[str, float]:
    counts: dict[str, float] = {}
    for line in httpx.get(f"{base_url}/metrics", timeout=30).text.splitlines():
        if line.startswith("engine:request_success_total{") and 'replica="' in line:
            replica = line.split('replica="', 1)[1].split('"', 1)[0]
            counts[replica] = counts.get(replica, 0.0) + float(line.rsplit(" ", 1)[1])
    return counts


def run(name: str, replicas: int, args: argparse.Namespace, requests, warmup) -> tuple[SystemResult, dict, dict]:
    """The system's result, its requests per replica and the CPU seconds by process kind while driven."""
    log_file = RESULTS / f"{args.output}.{name.replace(' ', '_')}.log"
    with server(replicas, log_file) as running:
        before = cpu_seconds_by_process()
        result = asyncio.run(drive_server(name, running.url, warmup, requests, args.output_len, args.concurrency,
                                          fresh_connections=False))
        cpu = cpu_used_between(before, cpu_seconds_by_process())
        time.sleep(3)  # replicas post their metrics every second
        shares = requests_per_replica(running.url) if replicas else {}
    return result, shares, cpu


def main() -> None:
    args = parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(resolve_model(str(default_model_path())))
    samples = sample_sharegpt(tokenizer, args.num_prompts + 1, seed=args.seed, fixed_output_len=args.output_len)
    warmup, requests = samples[0], samples[1:]
    systems = args.systems.split(",")
    runs = []  # rounds of every system in turn: run-to-run drift hits each system alike
    for round_number in range(1, args.repeats + 1):
        for name in systems:
            result, shares, cpu = run(name, SYSTEMS[name], args, requests, warmup)
            runs.append({"round": round_number, "system": name, **result.summary(), "requests_per_replica": shares,
                         "cpu_seconds": cpu})
    report = summarize(runs, systems)
    text = "\n".join(report_lines(args, runs, report)) + "\n"
    print(text)
    (RESULTS / f"{args.output}.md").write_text(text)
    (RESULTS / f"{args.output}.json").write_text(json.dumps({"runs": runs, **report}, indent=2))
    plot(runs, report["median_tokens_per_s"], RESULTS / f"{args.output}.png")


def summarize(runs: list[dict], systems: list[str]) -> dict:
    """Median output tokens/s per system, and two replicas over one replica (and over one server)
    round by round (each round's pair ran back to back) with their medians."""
    def tokens_per_s(name: str, round_number: int | None = None) -> list[float]:
        return [r["output_tokens_per_s"] for r in runs
                if r["system"] == name and round_number in (None, r["round"])]

    rounds = sorted({r["round"] for r in runs})
    report: dict = {"median_tokens_per_s": {name: statistics.median(tokens_per_s(name)) for name in systems}}
    for key, other in (("two_over_one_replica", "one replica"), ("two_over_one_server", "one server")):
        if {"two replicas", other} <= set(systems):
            ratios = [tokens_per_s("two replicas", n)[0] / tokens_per_s(other, n)[0] for n in rounds]
            report[key] = {"rounds": ratios, "median": statistics.median(ratios)}
    return report


def report_lines(args: argparse.Namespace, runs: list[dict], report: dict) -> list[str]:
    lines = [f"# Two replicas on Ray Serve against one server ({args.num_prompts} ShareGPT prompts, "
             f"{args.output_len} output tokens, {args.concurrency} streams, {args.repeats} rounds)", "",
             *machine_lines(machine()), "",
             "| round | system | output tok/s | mean TTFT ms | mean TPOT ms | failed | requests per replica |",
             "|---|---|---|---|---|---|---|"]
    for r in runs:
        shares = " / ".join(f"{count:.0f}" for count in r["requests_per_replica"].values()) or "-"
        lines.append(f"| {r['round']} | {r['system']} | {r['output_tokens_per_s']:.1f} | {r['mean_ttft_ms']:.0f} | "
                     f"{r['mean_tpot_ms']:.1f} | {r['num_failed']} | {shares} |")
    lines += ["", "median output tok/s: " + ", ".join(f"{name} {value:.1f}"
                                                        for name, value in report["median_tokens_per_s"].items())]
    if "two_over_one_replica" in report:
        pair = report["two_over_one_replica"]
        lines.append(f"two replicas / one replica, round by round: {', '.join(f'{x:.2f}x' for x in pair['rounds'])}; "
                     f"median **{pair['median']:.2f}x** ({'holds' if pair['median'] >= MIN_TWO_OVER_ONE else 'misses'}"
                     f": at least {MIN_TWO_OVER_ONE:.1f}x)")
    if "two_over_one_server" in report:
        lines.append(f"two replicas / one server without Ray: median {report['two_over_one_server']['median']:.2f}x")
    lines += ["", "CPU seconds while driven, by process (this machine's every process):", ""]
    lines += [f"- round {r['round']}, {r['system']} ({r['elapsed_s']:.1f} s): " +
              ", ".join(f"{kind} {seconds:.1f}" for kind, seconds in r["cpu_seconds"].items()) for r in runs]
    return lines


def plot(runs: list[dict], medians: dict[str, float], path: Path) -> None:
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    names = list(medians)
    colors = {"one server": "tab:gray", "one replica": "tab:cyan", "two replicas": "tab:blue"}
    for axis, metric, label in ((axes[0], "output_tokens_per_s", "output tokens/s"),
                                (axes[1], "mean_tpot_ms", "mean TPOT ms")):
        values = {name: [r[metric] for r in runs if r["system"] == name] for name in names}
        axis.bar(names, [statistics.median(values[name]) for name in names], color=[colors[n] for n in names])
        for i, name in enumerate(names):  # every round's figure over its median's bar
            axis.scatter([i] * len(values[name]), values[name], color="black", s=12, zorder=3)
        axis.set_ylabel(label + " (bar: median)")
    figure.suptitle("one server vs one and two Ray Serve replicas (same machine)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
