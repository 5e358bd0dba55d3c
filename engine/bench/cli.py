"""`engine bench serve | plot | simulate`: argparse wiring of the benchmark tools.

Flags follow `vllm bench serve` where it has them.  Heavy imports (the tokenizer, httpx,
matplotlib) wait until a subcommand runs, so `engine --help` stays fast.

    engine bench serve --base-url http://127.0.0.1:8000 --dataset sharegpt --num-prompts 200 \\
        --request-rates 1,2,4 --max-concurrency 64 --save-result results/ours.json
    engine bench plot results/ours.json results/llama.json -o results/both.png
"""

from __future__ import annotations

import argparse
import importlib
import logging
import math
from pathlib import Path
from typing import Any

from engine.bench.workload import DATASETS, load_tokenizer, sample_requests

DEFAULT_MAX_MODEL_LEN = 2048  # when the server does not say (vLLM's ShareGPT filter uses the same)


def add_bench_commands(commands: Any) -> None:
    """Add `bench` and its subcommands to the `engine` command's subparsers."""
    bench = commands.add_parser("bench", help="benchmark a serving system")
    tools = bench.add_subparsers(dest="bench_command", required=True)
    serve = tools.add_parser("serve", help="open-loop load on an OpenAI-compatible server",
                             formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_serve_arguments(serve)
    serve.set_defaults(handler=serve_main)
    plot = tools.add_parser("plot", help="plot saved results side by side")
    add_plot_arguments(plot)
    plot.set_defaults(handler=plot_main)
    try:  # written separately; absent (or not importable) means no `simulate` subcommand
        simulate_module = importlib.import_module("engine.bench.simulate")
    except ImportError:
        return
    capacity_module = importlib.import_module("engine.bench.capacity")
    simulate = tools.add_parser("simulate", help="simulate serving a trace, without a model")
    simulate_module.add_arguments(simulate)
    # --plan-gpus turns a simulation into a capacity plan (engine/bench/capacity.py).
    simulate.set_defaults(handler=lambda args: (capacity_module.main if getattr(args, "plan_gpus", None) is not None
                                                else simulate_module.main)(args))


def _rate(text: str) -> float:
    rate = float(text)
    if not rate > 0:
        raise argparse.ArgumentTypeError(f"a request rate must be positive (or inf), got {text}")
    return rate


def _rates(text: str) -> list[float]:
    return [_rate(part) for part in text.split(",") if part.strip()]


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    server = parser.add_argument_group("server")
    server.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server, without /v1")
    server.add_argument("--endpoint", default="/v1/completions", choices=["/v1/completions", "/v1/chat/completions"])
    server.add_argument("--model", default=None, help="model name to send (default: the first of GET /v1/models)")
    server.add_argument("--api-key", default=None, help="sent as `Authorization: Bearer`")
    server.add_argument("--fresh-connections", action="store_true",
                        help="a new connection per request (llama-server drops keep-alive under load)")
    server.add_argument("--max-model-len", type=int, default=None,
                        help="prompt + output limit of the dataset filters (default: the server's, else 2048)")
    server.add_argument("--tokenizer", default=None,
                        help="GGUF file or HF directory whose tokenizer counts prompt tokens (default: the engine's model)")
    data = parser.add_argument_group("dataset")
    data.add_argument("--dataset", "--dataset-name", dest="dataset", default="sharegpt", choices=DATASETS)
    data.add_argument("--num-prompts", type=int, default=200)
    data.add_argument("--max-output-tokens", type=int, default=None, help="cap every request's output length")
    data.add_argument("--sharegpt-output-len", type=int, default=None,
                      help="sharegpt/prefix: fixed output length instead of the reference answer's")
    data.add_argument("--max-prompt-len", type=int, default=1024, help="sharegpt/prefix: skip longer questions")
    data.add_argument("--random-input-len", type=int, default=1024)
    data.add_argument("--random-output-len", type=int, default=128)
    data.add_argument("--random-range-ratio", type=float, default=0.0)
    data.add_argument("--long-input-len", type=int, default=4096)
    data.add_argument("--long-output-len", type=int, default=128)
    data.add_argument("--prefix-len", type=int, default=512, help="tokens of each shared system prompt")
    data.add_argument("--num-prefixes", type=int, default=4)
    data.add_argument("--seed", type=int, default=0, help="of the dataset sample and the arrival process")
    load = parser.add_argument_group("load")
    load.add_argument("--request-rate", type=_rate, default=math.inf, help="requests/s; inf = all at once")
    load.add_argument("--request-rates", type=_rates, default=None, help="a sweep, e.g. 0.5,1,2: one run per rate")
    load.add_argument("--burstiness", type=float, default=1.0, help="1 = Poisson; gamma shape otherwise")
    load.add_argument("--max-concurrency", type=int, default=None)
    load.add_argument("--ignore-eos", action="store_true")
    load.add_argument("--slo-ttft-ms", type=float, default=None)
    load.add_argument("--slo-tpot-ms", type=float, default=None)
    load.add_argument("--skip-warmup", action="store_true", help="no unmeasured request before the run")
    out = parser.add_argument_group("output")
    out.add_argument("--label", default=None, help="this system's name in tables and plots (default: the model)")
    out.add_argument("--save-result", type=Path, default=None, help="JSON; the .md table and .png plots go beside it")
    out.add_argument("--disable-tqdm", action="store_true")


def add_plot_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results", nargs="+", type=Path, help="JSON files saved by `engine bench serve`")
    parser.add_argument("-o", "--output", type=Path, required=True, help="PNG to write")
    parser.add_argument("--title", default=None)


def serve_main(args: argparse.Namespace) -> None:
    """Run `engine bench serve`; mistakes in the flags or an unreachable server end with a message."""
    try:
        _serve(args)
    except (ValueError, RuntimeError) as e:
        raise SystemExit(f"engine bench serve: {e}") from None


def _serve(args: argparse.Namespace) -> None:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a log line per request
    from engine.bench.client import RequestOptions
    from engine.bench.report import format_summary, save_result
    from engine.bench.serve import RunConfig, fetch_model_info, run_benchmark, run_sweep

    if args.num_prompts < 1:
        raise ValueError(f"--num-prompts must be positive, got {args.num_prompts}")
    info = fetch_model_info(args.base_url, args.api_key)
    max_model_len = args.max_model_len or info.max_model_len or DEFAULT_MAX_MODEL_LEN
    num_warmups = 0 if args.skip_warmup else 1
    requests = sample_requests(args, load_tokenizer(args.tokenizer), args.num_prompts + num_warmups, max_model_len)
    warmup_request, requests = (requests[0], requests[1:]) if num_warmups else (None, requests)
    options = RequestOptions(model=args.model or info.id, endpoint=args.endpoint, ignore_eos=args.ignore_eos,
                             slo_ttft_ms=args.slo_ttft_ms, slo_tpot_ms=args.slo_tpot_ms)
    config = RunConfig(args.base_url, options, request_rate=args.request_rate, burstiness=args.burstiness,
                       max_concurrency=args.max_concurrency, seed=args.seed, fresh_connections=args.fresh_connections,
                       api_key=args.api_key, label=args.label, show_progress=not args.disable_tqdm)
    if args.request_rates:
        runs = run_sweep(config, args.request_rates, requests, warmup_request)
    else:
        runs = [run_benchmark(config, requests, warmup_request)]
    for run in runs:
        print(format_summary(run))
    if args.save_result is not None:
        extra = {"args": {key: value for key, value in vars(args).items() if key != "handler"}}
        save_result(args.save_result, runs, sweep=bool(args.request_rates), extra=extra)
        print(f"saved {args.save_result} and its .md and .png beside it")


def plot_main(args: argparse.Namespace) -> None:
    from engine.bench.report import plot_files

    plot_files(args.results, args.output, args.title)
    print(f"saved {args.output}")

