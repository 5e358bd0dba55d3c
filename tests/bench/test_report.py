"""Tables, labels and plots of saved results, on hand-made runs (no server)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from engine.bench.metrics import RequestRecord, summarize
from engine.bench.report import label_of, markdown_table, plot_files, runs_of, save_result


def _run(label: str, rate: float | str, ttft_s: float) -> dict[str, Any]:
    records = [RequestRecord(prompt_len=10, output_len=5, ttft_s=ttft_s * k, itl_s=[0.01] * 4, e2el_s=1.0 + k)
               for k in (1, 2, 3)]
    return {"label": label, "request_rate": rate, "max_concurrency": None, **summarize(records, 3.0)}


def test_labels_come_from_label_backend_or_file_name() -> None:
    assert label_of({"label": "a", "backend": "b"}) == "a"
    assert label_of({"label": "", "backend": "vllm"}) == "vllm"
    assert label_of({}, Path("/x/llama.json")) == "llama"
    assert label_of({"sweep": [{"label": "s"}]}) == "s"


def test_markdown_table_has_one_row_per_run() -> None:
    table = markdown_table([_run("a", 1.0, 0.1), _run("a", "inf", 0.2)])
    rows = table.strip().splitlines()
    assert len(rows) == 4 and rows[2].startswith("| a | 1.0 | - | 3 / 0 | 1.00 | 5.0 | 15.0 | 200 |")
    assert rows[3].split(" | ")[1] == "inf"


def test_sweeps_save_and_plot(tmp_path: Path) -> None:
    runs = [_run("ours", rate, 0.1 * rate) for rate in (0.5, 1.0, 2.0)] + [_run("ours", "inf", 1.0)]
    path = tmp_path / "ours.json"
    save_result(path, runs, sweep=True)
    saved = json.loads(path.read_text())
    assert runs_of(saved)[0]["request_rate"] == 0.5 and label_of(saved) == "ours"
    assert path.with_name("ours.sweep.png").stat().st_size > 10_000
    peer = tmp_path / "peer.json"
    peer.write_text(json.dumps({"sweep": [_run("peer", 1.0, 0.3)]}))
    plot_files([path, peer], tmp_path / "sweeps.png", title="two systems")
    assert (tmp_path / "sweeps.png").stat().st_size > 10_000


def test_plot_refuses_a_mix_of_sweeps_and_single_runs(tmp_path: Path) -> None:
    (tmp_path / "one.json").write_text(json.dumps(_run("one", 1.0, 0.1)))
    (tmp_path / "sweep.json").write_text(json.dumps({"sweep": [_run("s", 1.0, 0.1)]}))
    with pytest.raises(ValueError, match="not a mix"):
        plot_files([tmp_path / "one.json", tmp_path / "sweep.json"], tmp_path / "x.png")
