"""The weight-format quality benchmark (benchmarks/weight_formats.py) runs end to end on a tiny
workload: every format loads, scores held-out answers and generates greedily, and the report says
so.  It asserts what was measured, never the quality targets: those are the benchmark's to print."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
WEIGHT_FORMATS = ("dequantized", "native", "int8")
NUM_PROMPTS, OUTPUT_LEN, MAX_SEQ_LEN = 2, 4, 64


@pytest.mark.slow
def test_benchmark_measures_every_weight_format(tmp_path: Path) -> None:
    from engine.kernels.cpu import native_library

    if native_library.load() is None:
        pytest.skip("the C++ kernels do not load here: the native and int8 formats cannot run")
    result = tmp_path / "weight_formats.json"
    command = [sys.executable, "benchmarks/weight_formats.py", "--weight-formats", ",".join(WEIGHT_FORMATS),
               "--num-conversations", str(NUM_PROMPTS), "--num-prompts", str(NUM_PROMPTS),
               "--output-len", str(OUTPUT_LEN), "--max-seq-len", str(MAX_SEQ_LEN), "--save-result", str(result)]
    run = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    formats = json.loads(result.read_text())["formats"]
    assert list(formats) == list(WEIGHT_FORMATS)
    for name, figures in formats.items():
        assert figures["setup"] == {"dtype": "float32", "weight_format": name}
        assert math.isfinite(figures["perplexity"]) and figures["perplexity"] > 1, name
        assert len(figures["answer_nlls"]) == NUM_PROMPTS
        assert 0 < figures["num_scored_tokens"] <= NUM_PROMPTS * MAX_SEQ_LEN
        assert figures["num_prompts"] == NUM_PROMPTS and 0 <= figures["num_identical"] <= NUM_PROMPTS, name
        assert 0 <= figures["mean_agreeing_prefix"] <= OUTPUT_LEN
        assert all(len(token_ids) == OUTPUT_LEN for token_ids in figures["greedy_token_ids"])
    reference = formats["dequantized"]
    assert reference["perplexity_ratio"] == 1.0 and reference["num_identical"] == NUM_PROMPTS
    # every format scored the same tokens
    assert len({figures["num_scored_tokens"] for figures in formats.values()}) == 1
    table_rows = [line for line in result.with_suffix(".md").read_text().splitlines() if line.startswith("| ")]
    assert [row.split(" | ")[0] for row in table_rows] == ["| weight format", *(f"| {name}" for name in WEIGHT_FORMATS)]
    assert result.with_suffix(".png").stat().st_size > 5_000
