"""Two engine replicas on Ray Serve against one server, same machine, same ShareGPT requests.

    .venv/bin/python benchmarks/replicas.py                      # 64 prompts, 128 tokens, 32 streams
    .venv/bin/python benchmarks/replicas.py --num-prompts 16     # quick

1. one `engine serve` (every core to its one engine, no Ray);
2. `engine serve --replicas 1`: Ray Serve's proxy, our router (engine/replicas/), one engine;
3. `engine serve --replicas 2`: the same with two engines of half the cores each.

Both are driven exactly like benchmarks/serve_throughput.py (streaming /v1/completions, raw
ShareGPT prompts, EOS ignored, at most --concurrency in flight).  The acceptance point of the
scale-out issue: two replicas' output tokens/s at least one replica's.  After the run, each
replica's share of the requests is read from the router's /metrics (per-replica labels).
Writes benchmarks/results/<output>.json, .md and .png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
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
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="replicas")
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
    results, shares, cpu = {}, {}, {}
    for name in args.systems.split(","):
        results[name], shares[name], cpu[name] = run(name, SYSTEMS[name], args, requests, warmup)
    summaries = {name: result.summary() for name, result in results.items()}
    tokens_per_s = {name: figures["output_tokens_per_s"] for name, figures in summaries.items()}
    ratio = tokens_per_s["two replicas"] / tokens_per_s["one replica"] if {"two replicas", "one replica"} <= \
        tokens_per_s.keys() else float("nan")
    over_server = tokens_per_s["two replicas"] / tokens_per_s["one server"] if {"two replicas", "one server"} <= \
        tokens_per_s.keys() else float("nan")
    lines = [f"# Two replicas on Ray Serve against one server ({args.num_prompts} ShareGPT prompts, "
             f"{args.output_len} output tokens, {args.concurrency} streams)", "", *machine_lines(machine()), "",
             "| system | output tok/s | mean TTFT ms | mean TPOT ms | failed |", "|---|---|---|---|---|"]
    for name, figures in summaries.items():
        lines.append(f"| {name} | {figures['output_tokens_per_s']:.1f} | {figures['mean_ttft_ms']:.0f} | "
                     f"{figures['mean_tpot_ms']:.1f} | {figures['num_failed']} |")
    lines += ["", f"two replicas / one replica: **{ratio:.2f}x** output tokens/s "
              f"({'holds' if ratio >= MIN_TWO_OVER_ONE else 'misses'}: at least {MIN_TWO_OVER_ONE:.1f}x); "
              f"two replicas / one server without Ray: {over_server:.2f}x",
              f"requests per replica (router /metrics): {shares.get('two replicas')}", "",
              "CPU seconds while driven, by process (this machine's every process):", ""]
    lines += [f"- {name} ({results[name].elapsed_s:.1f} s): " +
              ", ".join(f"{kind} {seconds:.1f}" for kind, seconds in used.items()) for name, used in cpu.items()]
    text = "\n".join(lines) + "\n"
    print(text)
    (RESULTS / f"{args.output}.md").write_text(text)
    (RESULTS / f"{args.output}.json").write_text(json.dumps({"summaries": summaries, "ratio": ratio,
                                                             "over_server": over_server,
                                                             "requests_per_replica": shares, "cpu_seconds": cpu},
                                                            indent=2))
    plot(summaries, RESULTS / f"{args.output}.png")


def plot(summaries: dict[str, dict], path: Path) -> None:
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    names = list(summaries)
    colors = ["tab:gray", "tab:cyan", "tab:blue"][:len(names)]
    axes[0].bar(names, [summaries[n]["output_tokens_per_s"] for n in names], color=colors)
    axes[0].set_ylabel("output tokens/s")
    axes[1].bar(names, [summaries[n]["mean_tpot_ms"] for n in names], color=colors)
    axes[1].set_ylabel("mean TPOT ms")
    figure.suptitle("one server vs one and two Ray Serve replicas (same machine)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
