"""The retrieval baseline (benchmarks/retrieval_baseline.py) runs end to end on a tiny grid: the
real model answers short prompts, every cell is scored, and the table names every cell."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
TASKS, LENGTH, NUM_SAMPLES = ("passkey", "niah_multivalue"), 256, 2


@pytest.mark.slow
def test_benchmark_scores_every_cell(tmp_path: Path) -> None:
    result = tmp_path / "retrieval.json"
    command = [sys.executable, "benchmarks/retrieval_baseline.py", "--tasks", ",".join(TASKS), "--fillers", "repeat",
               "--lengths", str(LENGTH), "--num-samples", str(NUM_SAMPLES), "--save-result", str(result)]
    # The script runs from benchmarks/: point it at this checkout's engine, not an installed one.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    run = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-4000:]
    cells = json.loads(result.read_text())["cells"]
    assert [(cell["task"], cell["filler"], cell["length"]) for cell in cells] == [(t, "repeat", LENGTH) for t in TASKS]
    for cell in cells:
        assert len(cell["scores"]) == len(cell["generated"]) == NUM_SAMPLES
        assert all(0 <= score <= 1 for score in cell["scores"]) and all(n <= LENGTH for n in cell["prompt_lens"])
    assert cells[0]["accuracy"] > 0  # a 256-token passkey: a prompt or scoring broken end to end scores 0
    rows = [line for line in result.with_suffix(".md").read_text().splitlines() if line.startswith("| ")]
    assert [row.split(" | ")[:2] for row in rows[1:]] == [[f"| {task}", "repeat"] for task in TASKS]
