"""Benchmark results as text: the console block, a markdown table, and the files `--save-result`
writes (`save_result`) and `engine bench plot` reads (`plot_files`).

A saved result is one run's dictionary (`serve.run_benchmark`), or for a request-rate sweep
{"label": ..., "sweep": [run, run, ...]}.  Beside PATH.json go PATH.md (the table) and PATH.png
(latency CDFs); a sweep adds PATH.sweep.png (throughput and p99 latencies against the rate).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from engine.bench.plots import plot_runs, plot_sweeps  # matplotlib loads when one draws

# (title, key, format) of the console block, in vLLM's order.
SUMMARY_LINES = [
    ("Successful requests", "completed", "d"), ("Failed requests", "failed", "d"),
    ("Request rate configured (req/s)", "request_rate", ""), ("Maximum request concurrency", "max_concurrency", ""),
    ("Benchmark duration (s)", "duration", ".2f"), ("Total input tokens", "total_input_tokens", "d"),
    ("Total generated tokens", "total_output_tokens", "d"), ("Request throughput (req/s)", "request_throughput", ".2f"),
    ("Request goodput (req/s)", "request_goodput", ".2f"), ("SLO attainment", "slo_attainment", ".3f"),
    ("Output token throughput (tok/s)", "output_throughput", ".2f"),
    ("Total token throughput (tok/s)", "total_token_throughput", ".2f"),
]
LATENCY_TITLES = {"ttft": "Time to First Token", "tpot": "Time per Output Token (excl. 1st token)",
                  "itl": "Inter-token Latency", "e2el": "End-to-end Latency"}
# (column, key, format) of the markdown table: one row per run.
TABLE_COLUMNS = [
    ("system", "label", ""), ("rate (req/s)", "request_rate", ""), ("concurrency", "max_concurrency", ""),
    ("ok / failed", None, ""), ("req/s", "request_throughput", ".2f"), ("output tok/s", "output_throughput", ".1f"),
    ("total tok/s", "total_token_throughput", ".1f"), ("mean TTFT ms", "mean_ttft_ms", ".0f"),
    ("median TTFT ms", "median_ttft_ms", ".0f"), ("p99 TTFT ms", "p99_ttft_ms", ".0f"),
    ("mean TPOT ms", "mean_tpot_ms", ".1f"), ("median TPOT ms", "median_tpot_ms", ".1f"),
    ("p99 TPOT ms", "p99_tpot_ms", ".1f"), ("mean ITL ms", "mean_itl_ms", ".1f"),
    ("p99 E2EL ms", "p99_e2el_ms", ".0f"), ("goodput req/s", "request_goodput", ".2f"),
    ("SLO attainment", "slo_attainment", ".2f"),
]


def jsonable(value: Any) -> Any:
    """`value` with paths as strings and infinite floats as "inf" (JSON has no infinity)."""
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [jsonable(item) for item in value]
    if isinstance(value, dict):
        return {key: jsonable(item) for key, item in value.items()}
    return value


def cell(value: Any, spec: str) -> str:
    """A table cell: '-' for a missing figure."""
    if value is None:
        return "-"
    return format(value, spec) if spec else str(value)


def format_summary(result: dict[str, Any]) -> str:
    """The console block of one run, like `vllm bench serve` prints it."""
    lines = [" Serving Benchmark Result ".center(60, "=")]
    lines += [f"{title + ':':<45}{cell(result.get(key), spec)}" for title, key, spec in SUMMARY_LINES
              if result.get(key) is not None]
    for metric, title in LATENCY_TITLES.items():
        lines.append(f" {title} ".center(60, "-"))
        for stat in ("mean", "median", "std", "p90", "p99"):
            lines.append(f"{f'{stat.capitalize()} {metric.upper()} (ms):':<45}"
                         f"{cell(result.get(f'{stat}_{metric}_ms'), '.2f')}")
    if "server_mean_ttft_ms" in result:
        lines.append(" The server's own histograms ".center(60, "-"))
        lines.append(f"{'Server mean TTFT (ms):':<45}{cell(result.get('server_mean_ttft_ms'), '.2f')}")
        lines.append(f"{'Server mean E2EL (ms):':<45}{cell(result.get('server_mean_e2el_ms'), '.2f')}")
    errors = sorted({error for error in result.get("errors", []) if error})
    lines += [f"error: {error}" for error in errors[:5]]
    lines.append("=" * 60)
    return "\n".join(lines)


def markdown_table(runs: list[dict[str, Any]]) -> str:
    """One row per run, with the headline figures."""
    lines = ["| " + " | ".join(title for title, _, _ in TABLE_COLUMNS) + " |",
             "|" + "---|" * len(TABLE_COLUMNS)]
    for run in runs:
        cells = [f"{run['completed']} / {run['failed']}" if key is None else cell(run.get(key), spec)
                 for _, key, spec in TABLE_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def runs_of(saved: dict[str, Any]) -> list[dict[str, Any]]:
    """The runs a saved result holds: the sweep's, or the one run itself."""
    return list(saved["sweep"]) if "sweep" in saved else [saved]


def label_of(saved: dict[str, Any], path: Path | None = None) -> str:
    """The name a saved result goes by: its "label", else its "backend", else the file's name."""
    for key in ("label", "backend"):
        if saved.get(key):
            return str(saved[key])
    if "sweep" in saved and saved["sweep"]:
        return label_of(saved["sweep"][0], path)
    return path.stem if path is not None else "run"


def save_result(path: Path, runs: list[dict[str, Any]], *, sweep: bool, extra: dict[str, Any] | None = None) -> None:
    """Write PATH (JSON), PATH.md and the plots; `extra` (e.g. the arguments) goes into the JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    label = runs[0]["label"] if runs else path.stem
    saved = {"label": label, "sweep": runs, **(extra or {})} if sweep else {**runs[0], **(extra or {})}
    path.write_text(json.dumps(jsonable(saved), indent=2) + "\n")
    path.with_suffix(".md").write_text(markdown_table(runs))
    named = {f"{label} @ {run['request_rate']} req/s" if sweep else label: run for run in runs}
    plot_runs(named, path.with_suffix(".png"), title=f"{label}: {runs[0].get('num_prompts', '?')} requests")
    if sweep:
        plot_sweeps({label: runs}, path.with_name(path.stem + ".sweep.png"),
                    title=f"{label}: throughput and p99 latencies against the request rate")


def plot_files(paths: list[Path], out: Path, title: str | None = None) -> None:
    """`engine bench plot A.json B.json -o out.png`: saved results side by side, sweeps against the
    rate when every file is a sweep, else throughput and CDFs per file.  Raises ValueError on a
    mix of both."""
    saved = [(path, json.loads(path.read_text())) for path in paths]
    labels = _unique([label_of(result, path) for path, result in saved])
    is_sweep = ["sweep" in result for _, result in saved]
    if all(is_sweep):
        plot_sweeps({label: runs_of(result) for label, (_, result) in zip(labels, saved)}, out, title)
    elif not any(is_sweep):
        plot_runs({label: result for label, (_, result) in zip(labels, saved)}, out, title)
    else:
        raise ValueError("plot either request-rate sweeps or single runs, not a mix of both")


def _unique(labels: list[str]) -> list[str]:
    """The labels, with '#2', '#3', ... after repeats so no run hides another in a legend."""
    seen: dict[str, int] = {}
    unique = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        unique.append(label if seen[label] == 1 else f"{label} #{seen[label]}")
    return unique
