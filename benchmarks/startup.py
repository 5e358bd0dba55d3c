"""Time from `engine serve` to a server that answers: the seconds a user waits after the README's
first command has set up, with the model's elastic checkpoint and kernels cached.

Each run starts the server (`python -m engine.api.server`, the engine's defaults, on a free
loopback port) and polls GET /health every 50 ms until it answers 200, then stops it.  Beside it,
taking turns run by run so both see the same machine:
  - `--baseline-repo DIR`: the same command from another checkout (e.g. `git worktree add
    /tmp/before <commit>`), for a before/after ratio;
  - llama.cpp's llama-server on the same GGUF, where its binary is built
    (benchmarks/peers/build_llama_server.sh), the peer's ratio.
Also the GGUF parse alone, in this process: the engine's reader (engine/gguf_file.py) against
gguf's GGUFReader on the same file.  Prints a table; writes results/startup.{json,md,png}.

    .venv/bin/python benchmarks/startup.py [--runs 5] [--baseline-repo /tmp/before]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from engine.model.loader import default_model_path
from peers.llama_server import LlamaServer, default_binary, free_port, stop_process

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "benchmarks" / "results"
POLL_S = 0.05
READY_TIMEOUT_S = 600.0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="starts of each server, taking turns")
    parser.add_argument("--baseline-repo", type=Path, default=None,
                        help="another checkout whose server runs beside this one (its own .venv if it has one)")
    parser.add_argument("--skip-llama-server", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS / "startup")
    return parser.parse_args()


def seconds_to_ready(command: list[str], url: str, cwd: Path | None = None) -> float:
    """Wall seconds from starting `command` to its first 200 on {url}/health; then stops it."""
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while time.perf_counter() - start < READY_TIMEOUT_S:
            if process.poll() is not None:
                raise RuntimeError(f"{command[0]} exited with status {process.returncode} before it answered")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=1) as response:
                    if response.status == 200:
                        return time.perf_counter() - start
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(POLL_S)
        raise TimeoutError(f"{url}/health did not answer within {READY_TIMEOUT_S:.0f} s")
    finally:
        stop_process(process)


# A server to time: given a free port, its command and working directory.
Launcher = Callable[[int], tuple[list[str], Path | None]]


def engine_launcher(repo: Path) -> Launcher:
    python = repo / ".venv" / "bin" / "python"
    python = python if python.exists() else Path(sys.executable)
    return lambda port: ([str(python), "-m", "engine.api.server", "--port", str(port)], repo)


def llama_server_launcher(binary: Path) -> Launcher:
    return lambda port: (LlamaServer(binary, default_model_path(), num_slots=1, num_threads=2, ctx_size=2048,
                                     port=port).command, None)


def launchers(args: argparse.Namespace) -> dict[str, Launcher]:
    chosen = {"engine serve": engine_launcher(REPO_ROOT)}
    if args.baseline_repo is not None:
        chosen["engine serve, baseline"] = engine_launcher(args.baseline_repo.resolve())
    binary = default_binary()
    if not args.skip_llama_server and binary.exists():
        chosen["llama-server"] = llama_server_launcher(binary)
    elif not args.skip_llama_server:
        print(f"llama-server not built ({binary}); benchmarks/peers/build_llama_server.sh builds it")
    return chosen


def time_once(launcher: Launcher) -> float:
    port = free_port()
    command, cwd = launcher(port)
    return seconds_to_ready(command, f"http://127.0.0.1:{port}", cwd)


def gguf_parse_seconds(path: Path) -> dict[str, float]:
    from gguf import GGUFReader

    from engine.gguf_file import GGUFFile

    timed = {}
    for name, reader in (("engine/gguf_file.py", GGUFFile), ("gguf.GGUFReader", GGUFReader)):
        start = time.perf_counter()
        reader(path)
        timed[name] = time.perf_counter() - start
    return timed


def summary(times: list[float]) -> dict[str, float]:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}


def report_lines(results: dict[str, list[float]], parse: dict[str, float], runs: int) -> list[str]:
    ours = statistics.median(results["engine serve"])
    lines = [f"# Start-up: seconds from the command to a 200 on /health ({runs} runs each, taking turns)", "",
             "| server | median s | min s | max s | median / engine serve's |", "|---|---|---|---|---|"]
    for label, times in results.items():
        s = summary(times)
        lines.append(f"| {label} | {s['median_s']:.2f} | {s['min_s']:.2f} | {s['max_s']:.2f} | "
                     f"{s['median_s'] / ours:.2f}x |")
    lines += ["", "| GGUF parse of the default model | s |", "|---|---|"]
    lines += [f"| {name} | {seconds:.3f} |" for name, seconds in parse.items()]
    return lines


def plot(results: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 0.8 + 0.6 * len(results)))
    labels = list(results)
    axis.barh(labels, [statistics.median(results[label]) for label in labels], color="tab:blue")
    for row, label in enumerate(labels):
        axis.plot(results[label], [row] * len(results[label]), "k.", markersize=4)
    axis.set(xlabel="seconds to a 200 on /health (bar: median; dots: runs)", title="server start-up")
    axis.invert_yaxis()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    args = parse_args()
    chosen = launchers(args)
    results: dict[str, list[float]] = {label: [] for label in chosen}
    for run in range(args.runs):
        for label, launcher in chosen.items():
            results[label].append(time_once(launcher))
            print(f"run {run + 1}/{args.runs}: {label} ready in {results[label][-1]:.2f} s", flush=True)
    parse = gguf_parse_seconds(default_model_path())
    lines = report_lines(results, parse, args.runs)
    print("\n".join(lines))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps({"runs": results, "gguf_parse_s": parse}, indent=1))
    plot(results, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
