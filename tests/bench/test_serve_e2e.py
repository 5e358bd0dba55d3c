"""`engine bench serve` against our real server on loopback: the result's keys and values, the
server's own Prometheus histograms agreeing with the client, the CLI, saving and plotting."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from engine.bench.client import CHAT_COMPLETIONS, RequestOptions
from engine.bench.datasets import sample_prefix, sample_random
from engine.bench.report import format_summary, markdown_table, plot_files, save_result
from engine.bench.serve import RunConfig, fetch_model_info, run_benchmark, warm_up
from engine.bench.server_metrics import scrape, server_latency_means
from tests.api.conftest import MAX_MODEL_LEN, MODEL_NAME, REPO_ROOT, ServerProcess

OUTPUT_LEN = 16
SUMMARY_KEYS = {"duration", "completed", "failed", "total_input_tokens", "total_output_tokens",
                "request_throughput", "input_throughput", "output_throughput", "total_token_throughput",
                "request_goodput", "slo_attainment", "input_lens", "output_lens", "ttfts", "itls", "latencies",
                "start_times", "arrival_times", "errors", "label", "request_rate", "max_concurrency"}
SUMMARY_KEYS |= {f"{stat}_{metric}_ms" for stat in ("mean", "median", "std", "p90", "p99")
                 for metric in ("ttft", "tpot", "itl", "e2el")}
# The client's mean TTFT and E2EL against the server's histograms over the same requests.
MAX_RELATIVE_DISAGREEMENT = 0.10


@pytest.fixture(scope="module")
def random_run(bench_server: ServerProcess, tokenizer: Any) -> dict[str, Any]:
    """6 random prompts of 64 tokens, 16 output tokens each, Poisson arrivals at 4 req/s."""
    warmup, *requests = sample_random(tokenizer, 7, input_len=64, output_len=OUTPUT_LEN, seed=0)
    config = RunConfig(bench_server.base_url, RequestOptions(model=MODEL_NAME, ignore_eos=True),
                       request_rate=4.0, seed=0, show_progress=False, label="ours")
    return run_benchmark(config, requests, warmup_request=warmup)


def test_model_info_comes_from_the_server(bench_server: ServerProcess) -> None:
    info = fetch_model_info(bench_server.base_url)
    assert (info.id, info.max_model_len) == (MODEL_NAME, MAX_MODEL_LEN)


def test_random_run_keys_and_values(random_run: dict[str, Any]) -> None:
    run = random_run
    assert SUMMARY_KEYS <= run.keys()
    assert (run["completed"], run["failed"]) == (6, 0), run["errors"]
    assert run["output_lens"] == [OUTPUT_LEN] * 6  # from the usage chunk; EOS ignored
    assert run["total_output_tokens"] == 6 * OUTPUT_LEN and run["total_input_tokens"] == 6 * 64
    assert run["request_rate"] == 4.0 and run["label"] == "ours"
    # Six Poisson arrivals at 4 req/s, rescaled to end at 1.5 s; the run lasts past the last one.
    assert run["arrival_times"][-1] == pytest.approx(1.5)
    assert run["duration"] > 1.5
    assert all(start >= arrival - 1e-3 for start, arrival in zip(run["start_times"], run["arrival_times"]))
    for ttft, latency, itls in zip(run["ttfts"], run["latencies"], run["itls"]):
        assert 0 < ttft < latency
        assert 1 <= len(itls) <= OUTPUT_LEN - 1 and sum(itls) == pytest.approx(latency - ttft, abs=0.05)
    assert 0 < run["mean_ttft_ms"] <= run["p99_ttft_ms"] and run["mean_tpot_ms"] > 0
    assert run["output_throughput"] == pytest.approx(6 * OUTPUT_LEN / run["duration"])
    assert run["request_goodput"] is None  # no SLOs given


def test_client_latencies_agree_with_the_servers_histograms(bench_server: ServerProcess, tokenizer: Any) -> None:
    """8 requests: the harness's mean TTFT and E2EL within 10% of /metrics' over the same requests.

    The server stamps arrival after reading, parsing and tokenizing a request, and its first token
    before sending it, so the client's figures run 5-25 ms above the server's, never below (see
    benchmarks/README.md).  All 8 arrive at once so TTFTs (100-900 ms of queueing and prefill)
    dwarf that offset on a busy machine; at 8 req/s, with 130 ms TTFTs, it is 6-8%.
    """
    warmup, *requests = sample_random(tokenizer, 9, input_len=128, output_len=OUTPUT_LEN, seed=1)
    config = RunConfig(bench_server.base_url, RequestOptions(model=MODEL_NAME, ignore_eos=True), show_progress=False)
    warm_up(config, warmup)  # a cold server's first step is slow; its metrics stay out of the diff below
    before = scrape(bench_server.base_url)
    run = run_benchmark(config, requests)
    server = server_latency_means(before, scrape(bench_server.base_url))
    assert server["server_num_ttft"] == server["server_num_e2el"] == 8
    assert run["server_mean_ttft_ms"] == pytest.approx(server["server_mean_ttft_ms"], rel=0.01)
    for metric in ("ttft", "e2el"):
        client_ms, server_ms = run[f"mean_{metric}_ms"], server[f"server_mean_{metric}_ms"]
        assert client_ms == pytest.approx(server_ms, rel=MAX_RELATIVE_DISAGREEMENT), (metric, client_ms, server_ms)
        assert client_ms >= server_ms - 1.0, (metric, client_ms, server_ms)  # the client sees more, never less


def test_chat_prefix_run_with_slos_and_concurrency(bench_server: ServerProcess, tokenizer: Any) -> None:
    requests = sample_prefix(tokenizer, 4, prefix_len=64, num_prefixes=2, seed=3, max_model_len=MAX_MODEL_LEN,
                             max_output_len=8)
    options = RequestOptions(model=MODEL_NAME, endpoint=CHAT_COMPLETIONS, slo_ttft_ms=60_000, slo_tpot_ms=0.001)
    run = run_benchmark(RunConfig(bench_server.base_url, options, max_concurrency=2, show_progress=False), requests)
    assert (run["completed"], run["failed"]) == (4, 0), run["errors"]
    assert run["request_rate"] == "inf" and run["max_concurrency"] == 2
    assert all(0 < n <= 8 for n in run["output_lens"])  # EOS may end a chat answer early
    # A TPOT SLO of 1 us: only answers of a single token (no TPOT) can meet it.
    num_single = sum(n == 1 for n in run["output_lens"])
    assert run["slo_attainment"] == pytest.approx(num_single / 4)
    assert run["request_goodput"] == pytest.approx(num_single / run["duration"])


def test_failed_requests_are_counted_with_their_reason(bench_server: ServerProcess, tokenizer: Any) -> None:
    requests = sample_random(tokenizer, 2, input_len=8, output_len=4, seed=2)
    config = RunConfig(bench_server.base_url, RequestOptions(model="no-such-model"), show_progress=False)
    run = run_benchmark(config, requests)
    assert (run["completed"], run["failed"]) == (0, 2)
    assert all(error.startswith("HTTP 4") and "no-such-model" in error for error in run["errors"]), run["errors"]
    with pytest.raises(RuntimeError, match="warm-up request .* failed"):
        run_benchmark(config, requests, warmup_request=requests[0])


def test_save_result_and_plot(random_run: dict[str, Any], tmp_path: Path) -> None:
    path = tmp_path / "ours.json"
    save_result(path, [random_run], sweep=False, extra={"args": {"num_prompts": 6}})
    saved = json.loads(path.read_text())
    assert saved["completed"] == 6 and saved["args"] == {"num_prompts": 6}
    assert "| ours | 4.0 |" in path.with_suffix(".md").read_text()
    assert path.with_suffix(".png").stat().st_size > 10_000
    other = tmp_path / "peer.json"
    other.write_text(json.dumps({**random_run, "label": "", "backend": "peer"}))
    plot_files([path, other], tmp_path / "both.png")
    assert (tmp_path / "both.png").stat().st_size > 10_000
    assert "Mean TTFT (ms):" in format_summary(random_run)
    assert markdown_table([random_run]).count("\n") == 3


def test_cli_sweep_saves_json_table_and_plots(bench_server: ServerProcess, tmp_path: Path) -> None:
    """`engine bench serve --request-rates` in a subprocess, then `engine bench plot` on its result."""
    path = tmp_path / "sweep.json"
    command = [sys.executable, "-m", "engine.cli", "bench", "serve", "--base-url", bench_server.base_url,
               "--dataset", "random", "--random-input-len", "32", "--random-output-len", "8", "--num-prompts", "3",
               "--request-rates", "8,inf", "--ignore-eos", "--disable-tqdm", "--label", "sweep",
               "--save-result", str(path)]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("Serving Benchmark Result") == 2
    saved = json.loads(path.read_text())
    assert saved["label"] == "sweep" and [run["request_rate"] for run in saved["sweep"]] == [8.0, "inf"]
    assert all(run["completed"] == 3 and run["total_output_tokens"] == 24 for run in saved["sweep"])
    assert saved["args"]["num_prompts"] == 3 and saved["args"]["request_rates"] == [8.0, "inf"]
    assert path.with_name("sweep.sweep.png").exists() and path.with_suffix(".png").exists()
    plot = [sys.executable, "-m", "engine.cli", "bench", "plot", str(path), str(path), "-o", str(tmp_path / "p.png")]
    done = subprocess.run(plot, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "p.png").stat().st_size > 10_000
