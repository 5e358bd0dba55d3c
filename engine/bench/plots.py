"""PNG plots of benchmark results (matplotlib, Agg backend: no display needed).

- `plot_runs`: several runs side by side: throughput bars, then TTFT, TPOT and E2EL CDFs.
- `plot_sweeps`: request-rate sweeps: output throughput, p99 TTFT and p99 TPOT against the rate.

`engine bench plot` reads saved results and picks between the two: `report.plot_files`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

CDF_METRICS = (("ttfts", "TTFT (ms)"), ("tpots", "TPOT (ms)"), ("latencies", "E2EL (ms)"))
THROUGHPUTS = (("output_throughput", "output tok/s"), ("total_token_throughput", "total tok/s"))
SWEEP_PANELS = (("output_throughput", "output tokens/s"), ("p99_ttft_ms", "p99 TTFT (ms)"),
                ("p99_tpot_ms", "p99 TPOT (ms)"))


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def successful_values_ms(run: dict[str, Any], key: str) -> list[float]:
    """A per-request list of seconds, in ms, sorted, for the requests that succeeded."""
    errors = run.get("errors") or [""] * len(run.get(key, []))
    return sorted(1000.0 * value for value, error in zip(run.get(key, []), errors)
                  if not error and value is not None)


def plot_runs(runs: dict[str, dict[str, Any]], path: Path, title: str | None = None) -> None:
    """Throughput bars and latency CDFs, one colour per run (keyed by its label)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 1 + len(CDF_METRICS), figsize=(5 * (1 + len(CDF_METRICS)), 4.2))
    _throughput_bars(axes[0], runs)
    for axis, (key, xlabel) in zip(axes[1:], CDF_METRICS):
        for label, run in runs.items():
            values = successful_values_ms(run, key)
            if values:
                fractions = [(i + 1) / len(values) for i in range(len(values))]
                axis.plot(values, fractions, drawstyle="steps-post", label=label)
        axis.set_xlabel(xlabel)
        axis.set_ylabel("fraction of requests")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    _save(fig, path, title)


def _throughput_bars(axis: Any, runs: dict[str, dict[str, Any]]) -> None:
    width = 0.8 / max(len(runs), 1)
    for i, (label, run) in enumerate(runs.items()):
        xs = [k + (i - (len(runs) - 1) / 2) * width for k in range(len(THROUGHPUTS))]
        bars = axis.bar(xs, [run.get(key) or 0.0 for key, _ in THROUGHPUTS], width=width, label=label)
        axis.bar_label(bars, fmt="%.0f", fontsize=8)
    axis.set_xticks(range(len(THROUGHPUTS)), [title for _, title in THROUGHPUTS])
    axis.set_ylabel("tokens / s")
    axis.legend(fontsize=8)


def plot_sweeps(sweeps: dict[str, list[dict[str, Any]]], path: Path, title: str | None = None) -> None:
    """Figures against the configured request rate, one line per system; infinite-rate runs are
    left out (they have no place on the axis)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(SWEEP_PANELS), figsize=(5 * len(SWEEP_PANELS), 4.2))
    for label, runs in sweeps.items():
        points = sorted((float(run["request_rate"]), run) for run in runs
                        if not math.isinf(float(run["request_rate"])))
        for axis, (key, _) in zip(axes, SWEEP_PANELS):
            xs = [rate for rate, run in points if run.get(key) is not None]
            axis.plot(xs, [run[key] for _, run in points if run.get(key) is not None], marker="o", label=label)
    for axis, (_, ylabel) in zip(axes, SWEEP_PANELS):
        axis.set_xlabel("request rate (req/s)")
        axis.set_ylabel(ylabel)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    _save(fig, path, title)


def _save(fig: Any, path: Path, title: str | None) -> None:
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)

