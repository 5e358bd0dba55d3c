"""One ShareGPT trace against our server, llama.cpp's llama-server and offline transformers, in one run.

The servers are driven by `engine bench serve`'s own code (`engine.bench.serve.run_benchmark`):
streaming /v1/completions, raw ShareGPT prompts (no chat template), greedy, EOS ignored so every
system generates the same tokens, all requests arriving at once (or at --request-rate) with at
most --max-concurrency in flight.  Each server gets one unmeasured warm-up request first (an extra
prompt, so no measured prompt is cached beforehand).  llama-server gets a fresh connection per
request (it drops keep-alive connections under load) and is skipped with a message when its
binary is missing (build it with benchmarks/peers/build_llama_server.sh).  The transformers
baseline is batched `generate` on the same prompts and output lengths (offline_throughput.py's),
skipped with --skip-hf.

    .venv/bin/python benchmarks/compare.py --num-prompts 64 --max-concurrency 32 --output-len 128 --skip-hf
    .venv/bin/python benchmarks/compare.py --num-prompts 16 --max-concurrency 8 --output-len 0   # reference lengths

Prints the figures and the ratios ours / peer, and writes --save-result (JSON, every request's
timings included; git-ignored), a markdown table beside it (.md), a PNG (throughput bars and
TTFT/TPOT/E2EL CDFs) and the servers' logs (.ours.log, .llama-server.log; git-ignored).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
from pathlib import Path
from typing import Any

from engine.bench.client import RequestOptions
from engine.bench.datasets import SampleRequest, load_sharegpt, sample_sharegpt
from engine.bench.plots import plot_runs
from engine.bench.report import cell, format_summary, jsonable
from engine.bench.serve import RunConfig, fetch_model_info, run_benchmark
from engine.model.loader import default_model_path, load_tokenizer, resolve_model
from offline_throughput import run_transformers
from peers.llama_server import (LlamaServer, ServerProcess, add_llama_server_arguments, llama_server_from_args,
                                llama_server_version)
from peers.our_server import our_server
from serve_throughput import machine

REPO_ROOT = Path(__file__).resolve().parent.parent
OURS, LLAMA_SERVER, TRANSFORMERS = "our server", "llama-server", "transformers (offline)"
# Tokens of slack per llama-server slot beyond the longest prompt + output (BOS, tokenizer drift).
SLOT_SLACK_TOKENS = 16
# (column, key, format) of the figures table.
COLUMNS = [("output tok/s", "output_throughput", ".1f"), ("total tok/s", "total_token_throughput", ".1f"),
           ("mean TTFT ms", "mean_ttft_ms", ".0f"), ("median TTFT ms", "median_ttft_ms", ".0f"),
           ("p99 TTFT ms", "p99_ttft_ms", ".0f"), ("mean TPOT ms", "mean_tpot_ms", ".1f"),
           ("median TPOT ms", "median_tpot_ms", ".1f"), ("p99 TPOT ms", "p99_tpot_ms", ".1f"),
           ("failed", "failed", "d")]
RATIO_KEYS = ["output_throughput", "total_token_throughput", "mean_ttft_ms", "mean_tpot_ms"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--max-concurrency", type=int, default=32,
                        help="streams in flight; also our max_num_seqs and llama-server's slots")
    parser.add_argument("--request-rate", type=float, default=math.inf, help="requests/s; inf = all at once")
    parser.add_argument("--output-len", type=int, default=128,
                        help="tokens generated per request; 0 = the reference answer's length")
    parser.add_argument("--max-output-tokens", type=int, default=None, help="with --output-len 0: cap them")
    parser.add_argument("--max-prompt-len", type=int, default=1024, help="skip longer prompts (tokens)")
    parser.add_argument("--max-prompt-chars", type=int, default=None, help="cut longer prompts to this many characters")
    parser.add_argument("--seed", type=int, default=0, help="ShareGPT shuffle seed")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--max-num-batched-tokens", type=int, default=None, help="ours; default: the engine's")
    add_llama_server_arguments(parser)
    parser.add_argument("--skip-hf", action="store_true", help="no offline transformers baseline")
    parser.add_argument("--hf-batch-size", type=int, default=16)
    parser.add_argument("--save-result", type=Path, default=REPO_ROOT / "benchmarks/results/compare.json",
                        help="JSON; the .md table and .png plot go beside it")
    args = parser.parse_args()
    if min(args.num_prompts, args.max_concurrency, args.max_prompt_len) < 1 or args.output_len < 0:
        parser.error("--num-prompts, --max-concurrency and --max-prompt-len must be positive, --output-len >= 0")
    return args


def sample_trace(args: argparse.Namespace) -> tuple[SampleRequest, list[SampleRequest]]:
    """The warm-up request and the measured ones (one more prompt than measured, taken first)."""
    tokenizer = load_tokenizer(resolve_model(None))
    warmup, *requests = sample_sharegpt(
        tokenizer, args.num_prompts + 1, seed=args.seed, max_prompt_len=args.max_prompt_len,
        fixed_output_len=args.output_len or None, max_prompt_chars=args.max_prompt_chars,
        max_output_len=args.max_output_tokens)
    load_sharegpt.cache_clear()  # the parsed dataset (~200 MB) is not needed past sampling
    return warmup, requests


# --- the systems ---------------------------------------------------------------------------------

def llama_server(args: argparse.Namespace, requests: list[SampleRequest], log_file: Path) -> LlamaServer | None:
    """llama-server with one slot per stream, each slot holding the trace's longest request."""
    slot_tokens = max(r.prompt_len + r.expected_output_len for r in requests) + SLOT_SLACK_TOKENS
    return llama_server_from_args(args, num_slots=args.max_concurrency, ctx_size=args.max_concurrency * slot_tokens,
                                  log_file=log_file)


def drive(name: str, server: ServerProcess, args: argparse.Namespace, warmup: SampleRequest,
          requests: list[SampleRequest], fresh_connections: bool) -> dict[str, Any]:
    """Start `server`, run the trace against it, stop it."""
    with server as running:
        model = fetch_model_info(running.url).id
        config = RunConfig(running.url, RequestOptions(model=model, ignore_eos=True), request_rate=args.request_rate,
                           max_concurrency=args.max_concurrency, seed=args.seed,
                           fresh_connections=fresh_connections, label=name)
        run = run_benchmark(config, requests, warmup)
    print(format_summary(run))
    return run


def transformers_run(args: argparse.Namespace, requests: list[SampleRequest]) -> dict[str, Any]:
    """Offline batched `generate` on the same prompts, as a run with throughputs and no latencies."""
    result = run_transformers(default_model_path(), requests, args.hf_batch_size, args.dtype)
    figures = result.throughputs()
    return {"label": TRANSFORMERS, "duration": result.elapsed_s, "completed": result.num_requests, "failed": 0,
            "total_input_tokens": result.num_input_tokens, "total_output_tokens": result.num_output_tokens,
            "request_throughput": figures["requests_per_s"], "input_throughput": figures["input_tokens_per_s"],
            "output_throughput": figures["output_tokens_per_s"],
            "total_token_throughput": figures["total_tokens_per_s"]}


# --- report --------------------------------------------------------------------------------------

def ratios_of(runs: dict[str, dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """ours / peer for each figure of RATIO_KEYS (None where either side lacks it).  Throughput
    ratios above 1 and latency ratios below 1 favour ours."""
    ours = runs.get(OURS)
    if ours is None:
        return {}
    ratios: dict[str, dict[str, float | None]] = {}
    for name, peer in runs.items():
        if name != OURS:
            ratios[name] = {key: ours[key] / peer[key] if ours.get(key) and peer.get(key) else None
                            for key in RATIO_KEYS}
    return ratios


def markdown(runs: dict[str, dict[str, Any]], ratios: dict[str, dict[str, float | None]]) -> str:
    lines = ["| system | " + " | ".join(title for title, _, _ in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(cell(run.get(key), spec) for _, key, spec in COLUMNS) + " |"
              for name, run in runs.items()]
    if ratios:
        lines += ["", "| ours / peer | output tok/s | total tok/s | mean TTFT | mean TPOT |", "|---|---|---|---|---|"]
        lines += [f"| {name} | " + " | ".join(cell(ratio[key], ".2f") for key in RATIO_KEYS) + " |"
                  for name, ratio in ratios.items()]
    return "\n".join(lines) + "\n"


def save(args: argparse.Namespace, runs: dict[str, dict[str, Any]], extra: dict[str, Any]) -> None:
    ratios = ratios_of(runs)
    table = markdown(runs, ratios)
    print("\n" + table)
    path = args.save_result
    report = {"args": vars(args), "machine": machine(), **extra, "runs": runs, "ratios": ratios}
    path.write_text(json.dumps(jsonable(report), indent=2) + "\n")
    path.with_suffix(".md").write_text(table)
    lengths = f"{args.output_len} output tokens" if args.output_len else "reference output lengths"
    title = (f"{args.num_prompts} ShareGPT requests, {args.max_concurrency} concurrent, {lengths}, "
             f"{os.cpu_count()} CPU cores, one run")
    plot_runs(runs, path.with_suffix(".png"), title)
    print(f"saved {path}, {path.with_suffix('.md').name} and {path.with_suffix('.png').name}")


def main() -> None:
    args = parse_args()
    warmup, requests = sample_trace(args)
    args.save_result.parent.mkdir(parents=True, exist_ok=True)
    log_stem = args.save_result.with_suffix("")  # server logs beside the result (*.log is git-ignored)
    extra: dict[str, Any] = {"num_input_tokens": sum(r.prompt_len for r in requests),
                             "num_output_tokens": sum(r.expected_output_len for r in requests)}
    runs = {OURS: drive(OURS, our_server(max_num_seqs=args.max_concurrency, dtype=args.dtype,
                                      max_num_batched_tokens=args.max_num_batched_tokens,
                                      log_file=Path(f"{log_stem}.ours.log")), args, warmup, requests,
                        fresh_connections=False)}
    peer = llama_server(args, requests, Path(f"{log_stem}.llama-server.log"))
    if peer is not None:
        extra["llama_server"] = {"version": llama_server_version(args.llama_server), "command": peer.command}
        runs[LLAMA_SERVER] = drive(LLAMA_SERVER, peer, args, warmup, requests, fresh_connections=True)
    if not args.skip_hf:
        gc.collect()
        runs[TRANSFORMERS] = transformers_run(args, requests)
    save(args, runs, extra)


if __name__ == "__main__":
    main()
