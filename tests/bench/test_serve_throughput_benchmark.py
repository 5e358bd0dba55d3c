"""The server-throughput benchmark (benchmarks/serve_throughput.py) runs end to end on a fresh
clone: the offline engine and our server in its own process, on real ShareGPT prompts, then our
server's single stream, with its report, table and plot written.  It asserts what was measured,
never how fast: the speed targets are the benchmark's to print (llama-server is left out;
building it takes minutes)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
NUM_PROMPTS, OUTPUT_LEN, SINGLE_STREAM_TOKENS = 4, 8, 8


@pytest.mark.slow
def test_benchmark_measures_offline_engine_and_server(tmp_path: Path) -> None:
    result = tmp_path / "serve.json"
    command = [sys.executable, "benchmarks/serve_throughput.py", "--num-prompts", str(NUM_PROMPTS),
               "--concurrency", "4", "--output-len", str(OUTPUT_LEN), "--max-prompt-len", "256",
               "--single-stream-tokens", str(SINGLE_STREAM_TOKENS), "--skip-llama-server",
               "--save-result", str(result)]
    run = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    report = json.loads(result.read_text())
    summaries = report["summaries"]
    assert set(summaries) == {"offline engine", "our server"}
    for name, summary in summaries.items():
        # every request produced exactly its tokens (EOS ignored) and none failed
        assert summary["output_tokens_per_s"] * summary["elapsed_s"] == pytest.approx(NUM_PROMPTS * OUTPUT_LEN), name
    assert summaries["our server"]["num_failed"] == 0
    streamed = report["requests"]["our server"]
    assert len(streamed) == NUM_PROMPTS
    assert all(r["num_output_tokens"] == OUTPUT_LEN and r["ttft_s"] <= r["latency_s"] for r in streamed)
    single = report["single_stream"]["our server"]
    assert single["error"] is None and single["num_output_tokens"] == SINGLE_STREAM_TOKENS
    assert summaries["our server"]["single_stream_tpot_ms"] > 0
    assert summaries["offline engine"]["single_stream_tpot_ms"] is None
    # what ran is named: the CPU, and the dtype and weight format the engine resolved from "auto"
    assert report["machine"]["cpu"]
    offline_setup = report["setups"]["offline engine"]
    assert offline_setup["dtype"] in ("bfloat16", "float32")
    # the format, and where activations are rounded to Q8 from how many rows ("native+q8>4")
    assert offline_setup["weight_format"].split("+")[0] in ("dequantized", "native", "int8")
    assert report["setups"]["our server"] == offline_setup  # read back from the server's start-up line
    ratio = report["ratios"]["server_over_offline_output_tokens"]
    assert ratio > 0
    assert "our server / offline output tok/s" in run.stdout
    table_rows = [line for line in result.with_suffix(".md").read_text().splitlines() if line.startswith("| ")]
    assert [row.split(" | ")[0] for row in table_rows] == ["| system", "| offline engine", "| our server"]
    assert "single-stream TPOT ms" in table_rows[0]
    assert result.with_suffix(".png").stat().st_size > 10_000
