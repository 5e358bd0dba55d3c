"""Server throughput on ShareGPT: our OpenAI server against the offline engine and llama.cpp's server.

One run, one set of requests, three systems one after another on the same machine:

1. the offline engine (`LLM.generate`, all requests at once, max_num_seqs = concurrency);
2. our server (`python -m engine.api.server`) in a subprocess, driven by `concurrency` streaming
   /v1/completions requests at a time over keep-alive connections;
3. llama.cpp's `llama-server` on the same GGUF (built by benchmarks/peers/build_llama_server.sh),
   one slot per stream, driven the same way but with a fresh connection per request: it drops
   keep-alive connections under load.  Skipped with a message when the binary is missing.

Every request is a raw ShareGPT prompt (no chat template) generating exactly --output-len tokens
(greedy, EOS ignored), so every system does the same work.  Like `vllm bench serve`: requests
all arrive at once and at most --concurrency are in flight; TTFT is the time to the first chunk
with text, TPOT = (latency - TTFT) / (output tokens - 1), output tokens come from the final usage
chunk (`stream_options.include_usage`), and total tokens/s counts the sampled prompt lengths.

After the throughput phase each server also gets a single stream, alone: one short prompt (the
first sampled prompt of 32 tokens or more, cut to about 32), greedy, EOS ignored, exactly
--single-stream-tokens output tokens, streamed once as a warm-up (8 tokens) and then measured:
its TPOT is the latency one user sees when nothing else runs (0 skips it).

    .venv/bin/python benchmarks/serve_throughput.py
    .venv/bin/python benchmarks/serve_throughput.py --num-prompts 16 --skip-llama-server   # quick
    ELASTIC_ENGINE_CPU_ISA=avx2 .venv/bin/python benchmarks/serve_throughput.py   # both peers AVX2-only

Our engine runs at --dtype and --weight-format ("auto": what the engine picks for this CPU); the
result names the CPU, the ISA mask and the dtype and weight format each of ours actually used.
Writes --save-result (JSON, per-request timings included), a markdown table beside it (.md), a
PNG of throughputs, TTFT/TPOT CDFs and single-stream TPOTs (.png), and the servers' logs
(.ours.log, .llama-server.log).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import time
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from tqdm import tqdm

from engine.bench.datasets import SampleRequest, load_sharegpt, sample_sharegpt
from engine.config import DTYPES, WEIGHT_FORMATS
from peers.llama_server import add_llama_server_arguments, llama_server_from_args, llama_server_version
from peers.machine import engine_setup, machine, machine_lines, setup_line
from peers.our_server import engine_setup_from_log, our_server

REPO_ROOT = Path(__file__).resolve().parent.parent
REQUEST_TIMEOUT_S = 600.0
WARMUP_OUTPUT_LEN = 8
SINGLE_STREAM_PROMPT_LEN = 32  # tokens, about: the cut prompt is sent as text
# Acceptance points of the server issue.
MIN_SERVER_OVER_OFFLINE = 0.9
MIN_OURS_OVER_LLAMA_SERVER = 2.5
MAX_SINGLE_STREAM_TPOT_RATIO = 1.2  # ours / llama-server


@dataclass(frozen=True, slots=True)
class RequestResult:
    """One streamed request as the client saw it (times in seconds from sending it)."""

    prompt_len: int
    num_output_tokens: int
    ttft_s: float | None
    latency_s: float
    error: str | None = None

    @property
    def tpot_s(self) -> float | None:
        if self.ttft_s is None or self.num_output_tokens < 2:
            return None
        return (self.latency_s - self.ttft_s) / (self.num_output_tokens - 1)


@dataclass(slots=True)
class SystemResult:
    """What one system did with all the requests; `requests` is empty for the offline engine, and
    `single_stream` is the measured request of the single-stream phase (servers only)."""

    name: str
    num_input_tokens: int
    num_output_tokens: int
    elapsed_s: float
    requests: list[RequestResult] = field(default_factory=list)
    single_stream: RequestResult | None = None

    def summary(self) -> dict[str, float | int | None]:
        single_tpot_s = self.single_stream.tpot_s if self.single_stream is not None else None
        figures: dict[str, float | int | None] = {
            "num_failed": sum(r.error is not None for r in self.requests),
            "elapsed_s": self.elapsed_s,
            "output_tokens_per_s": self.num_output_tokens / self.elapsed_s,
            "total_tokens_per_s": (self.num_input_tokens + self.num_output_tokens) / self.elapsed_s,
        }
        for metric in ("ttft", "tpot"):
            values = [getattr(r, f"{metric}_s") for r in self.requests]
            values_ms = np.array([v * 1000 for v in values if v is not None])
            for stat, fn in (("mean", np.mean), ("median", np.median), ("p99", lambda a: np.percentile(a, 99))):
                figures[f"{stat}_{metric}_ms"] = float(fn(values_ms)) if values_ms.size else None
        figures["single_stream_tpot_ms"] = None if single_tpot_s is None else single_tpot_s * 1000
        return figures


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=32,
                        help="streams in flight; also our max_num_seqs and llama-server's slots")
    parser.add_argument("--output-len", type=int, default=128, help="tokens generated per request")
    parser.add_argument("--max-prompt-len", type=int, default=1024, help="skip longer prompts (tokens)")
    parser.add_argument("--max-prompt-chars", type=int, default=None, help="cut longer prompts to this many characters")
    parser.add_argument("--seed", type=int, default=0, help="ShareGPT shuffle seed")
    parser.add_argument("--dtype", default="auto", choices=DTYPES, help="ours; auto: the engine's pick for this CPU")
    parser.add_argument("--weight-format", default="auto", choices=WEIGHT_FORMATS,
                        help="ours; auto: the engine's pick for this CPU")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None, help="ours; default: the engine's")
    parser.add_argument("--skip-offline", action="store_true")
    parser.add_argument("--single-stream-tokens", type=int, default=256,
                        help="output tokens of the single-stream phase; 0 skips it")
    add_llama_server_arguments(parser)
    parser.add_argument("--save-result", type=Path, default=REPO_ROOT / "benchmarks/results/serve_throughput.json",
                        help="JSON; the .md table and .png plot go beside it")
    args = parser.parse_args()
    if min(args.num_prompts, args.concurrency, args.output_len, args.max_prompt_len) < 1:
        parser.error("--num-prompts, --concurrency, --output-len and --max-prompt-len must be positive")
    if args.single_stream_tokens < 0:
        parser.error("--single-stream-tokens must be >= 0")
    return args


# --- the offline engine ----------------------------------------------------------------------

def build_engine(args: argparse.Namespace) -> Any:
    from engine import LLM

    extra = {} if args.max_num_batched_tokens is None else {"max_num_batched_tokens": args.max_num_batched_tokens}
    return LLM(dtype=args.dtype, weight_format=args.weight_format, max_num_seqs=args.concurrency, **extra)


def run_offline(llm: Any, warmup_request: SampleRequest, requests: list[SampleRequest],
                output_len: int) -> SystemResult:
    from engine import SamplingParams

    warmup = SamplingParams(temperature=0.0, max_tokens=WARMUP_OUTPUT_LEN, ignore_eos=True)
    llm.generate([warmup_request.prompt], warmup, use_tqdm=False)
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    start = time.perf_counter()
    outputs = llm.generate([r.prompt for r in requests], params, use_tqdm=True)
    elapsed_s = time.perf_counter() - start
    num_output_tokens = sum(len(output.outputs[0].token_ids) for output in outputs)
    return SystemResult("offline engine", sum(r.prompt_len for r in requests), num_output_tokens, elapsed_s)


# --- streaming clients -----------------------------------------------------------------------

def completion_body(prompt: str, max_tokens: int) -> dict[str, Any]:
    """A streaming /v1/completions body that both servers read the same way.

    `n_predict` is llama-server's own name for max_tokens; our server ignores unknown fields.
    """
    return {"prompt": prompt, "max_tokens": max_tokens, "n_predict": max_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}


async def stream_completion(client: httpx.AsyncClient, url: str, request: SampleRequest,
                            max_tokens: int) -> RequestResult:
    """Send one streaming completion and time it from the client's side."""
    ttft_s, num_text_chunks, num_usage_tokens = None, 0, None
    start = time.perf_counter()
    try:
        async with client.stream("POST", url, json=completion_body(request.prompt, max_tokens)) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode(errors="replace")[:200]
                return RequestResult(request.prompt_len, 0, None, time.perf_counter() - start,
                                     f"HTTP {response.status_code}: {body}")
            async for line in response.aiter_lines():
                if not line.startswith("data:") or (data := line.removeprefix("data:").strip()) == "[DONE]":
                    continue
                chunk = json.loads(data)
                if chunk.get("usage"):
                    num_usage_tokens = chunk["usage"]["completion_tokens"]
                if any(choice.get("text") for choice in chunk.get("choices") or []):
                    num_text_chunks += 1
                    if ttft_s is None:
                        ttft_s = time.perf_counter() - start
    except httpx.HTTPError as e:
        return RequestResult(request.prompt_len, 0, ttft_s, time.perf_counter() - start, f"{type(e).__name__}: {e}")
    num_output_tokens = num_usage_tokens if num_usage_tokens is not None else num_text_chunks
    return RequestResult(request.prompt_len, num_output_tokens, ttft_s, time.perf_counter() - start)


def new_client(concurrency: int, fresh_connections: bool) -> httpx.AsyncClient:
    # Without keep-alive every request opens (and closes) its own connection.
    limits = httpx.Limits(max_connections=concurrency,
                          max_keepalive_connections=0 if fresh_connections else concurrency)
    headers = {"Connection": "close"} if fresh_connections else {}
    return httpx.AsyncClient(limits=limits, headers=headers, timeout=REQUEST_TIMEOUT_S)


async def drive_server(name: str, base_url: str, warmup_request: SampleRequest, requests: list[SampleRequest],
                       output_len: int, concurrency: int, fresh_connections: bool) -> SystemResult:
    """One warm-up request, then all requests with at most `concurrency` in flight."""
    url = f"{base_url}/v1/completions"
    semaphore = asyncio.Semaphore(concurrency)
    async with new_client(concurrency, fresh_connections) as client:
        warmup = await stream_completion(client, url, warmup_request, WARMUP_OUTPUT_LEN)
        if warmup.error is not None:
            raise RuntimeError(f"{name} failed the warm-up request: {warmup.error}")
        with tqdm(total=len(requests), desc=name) as progress:
            async def one(request: SampleRequest) -> RequestResult:
                async with semaphore:
                    result = await stream_completion(client, url, request, output_len)
                progress.update(1)
                return result

            start = time.perf_counter()
            results = await asyncio.gather(*(one(request) for request in requests))
            elapsed_s = time.perf_counter() - start
    return SystemResult(name, sum(r.prompt_len for r in requests),
                        sum(r.num_output_tokens for r in results), elapsed_s, list(results))


async def single_stream(name: str, base_url: str, request: SampleRequest, num_tokens: int,
                        fresh_connections: bool) -> RequestResult:
    """`request` alone, twice: a warm-up of WARMUP_OUTPUT_LEN tokens, then `num_tokens` measured."""
    url = f"{base_url}/v1/completions"
    async with new_client(1, fresh_connections) as client:
        warmup = await stream_completion(client, url, request, WARMUP_OUTPUT_LEN)
        if warmup.error is not None:
            return warmup
        print(f"{name}: single stream, {num_tokens} tokens")
        return await stream_completion(client, url, request, num_tokens)


def single_stream_request(tokenizer: Any, samples: list[SampleRequest], num_tokens: int) -> SampleRequest:
    """The first sampled prompt of at least SINGLE_STREAM_PROMPT_LEN tokens (else the first) cut to
    that many tokens, as text both servers take."""
    prompt = next((r for r in samples if r.prompt_len >= SINGLE_STREAM_PROMPT_LEN), samples[0]).prompt
    text = tokenizer.decode(tokenizer.encode(prompt)[:SINGLE_STREAM_PROMPT_LEN])
    return SampleRequest(prompt=text, prompt_len=len(tokenizer.encode(text)), expected_output_len=num_tokens)


# --- the servers -----------------------------------------------------------------------------

def run_against(name: str, server: AbstractContextManager[Any], warmup_request: SampleRequest,
                requests: list[SampleRequest], single_request: SampleRequest, args: argparse.Namespace,
                fresh_connections: bool) -> SystemResult:
    """The throughput phase, then (unless --single-stream-tokens 0) the single-stream phase."""
    with server as running:
        result = asyncio.run(drive_server(name, running.url, warmup_request, requests, args.output_len,
                                          args.concurrency, fresh_connections))
        if args.single_stream_tokens:
            result.single_stream = asyncio.run(single_stream(name, running.url, single_request,
                                                             args.single_stream_tokens, fresh_connections))
    return result


# --- report ----------------------------------------------------------------------------------

COLUMNS = [("output tok/s", "output_tokens_per_s", ".1f"), ("total tok/s", "total_tokens_per_s", ".1f"),
           ("mean TTFT ms", "mean_ttft_ms", ".0f"), ("median TTFT ms", "median_ttft_ms", ".0f"),
           ("p99 TTFT ms", "p99_ttft_ms", ".0f"), ("mean TPOT ms", "mean_tpot_ms", ".1f"),
           ("median TPOT ms", "median_tpot_ms", ".1f"), ("p99 TPOT ms", "p99_tpot_ms", ".1f"),
           ("single-stream TPOT ms", "single_stream_tpot_ms", ".2f")]


def columns_of(summaries: dict[str, dict[str, Any]]) -> list[tuple[str, str, str]]:
    """The columns some system has a figure for (no single-stream column when it was skipped)."""
    return [column for column in COLUMNS if any(figures[column[1]] is not None for figures in summaries.values())]


def table_rows(summaries: dict[str, dict[str, Any]]) -> list[list[str]]:
    def cell(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    columns = columns_of(summaries)
    return [[name, *(cell(figures[key], spec) for _, key, spec in columns)] for name, figures in summaries.items()]


def ratios_of(summaries: dict[str, dict[str, Any]]) -> dict[str, float]:
    ours = summaries.get("our server")
    ratios = {}
    for other, label in (("offline engine", "server_over_offline"), ("llama-server", "ours_over_llama_server")):
        if ours is not None and other in summaries:
            for key in ("output_tokens_per_s", "total_tokens_per_s"):
                ratios[f"{label}_{key.removesuffix('_per_s')}"] = ours[key] / summaries[other][key]
    theirs = summaries.get("llama-server")
    if ours is not None and theirs is not None and None not in (ours["single_stream_tpot_ms"],
                                                                theirs["single_stream_tpot_ms"]):
        ratios["ours_over_llama_server_single_stream_tpot"] = (ours["single_stream_tpot_ms"]
                                                               / theirs["single_stream_tpot_ms"])
    return ratios


def acceptance(ratios: dict[str, float]) -> list[str]:
    lines = []
    if "server_over_offline_output_tokens" in ratios:
        ratio = ratios["server_over_offline_output_tokens"]
        verdict = "meets" if ratio >= MIN_SERVER_OVER_OFFLINE else "MISSES"
        lines.append(f"our server / offline output tok/s = {ratio:.3f} ({verdict} >= {MIN_SERVER_OVER_OFFLINE})")
    if "ours_over_llama_server_output_tokens" in ratios:
        ratio = ratios["ours_over_llama_server_output_tokens"]
        verdict = "meets" if ratio >= MIN_OURS_OVER_LLAMA_SERVER else "MISSES"
        lines.append(f"our server / llama-server output tok/s = {ratio:.2f}x "
                     f"({verdict} >= {MIN_OURS_OVER_LLAMA_SERVER}x)")
    if "ours_over_llama_server_single_stream_tpot" in ratios:
        ratio = ratios["ours_over_llama_server_single_stream_tpot"]
        verdict = "meets" if ratio <= MAX_SINGLE_STREAM_TPOT_RATIO else "MISSES"
        lines.append(f"our server / llama-server single-stream TPOT = {ratio:.2f} "
                     f"({verdict} <= {MAX_SINGLE_STREAM_TPOT_RATIO})")
    return lines


def setting_lines(report: dict[str, Any]) -> list[str]:
    """Where it ran and what each of ours computed with, for the printed and markdown reports."""
    return machine_lines(report["machine"]) + [setup_line(name, setup) for name, setup in report["setups"].items()]


def print_report(summaries: dict[str, dict[str, Any]], ratios: dict[str, float], settings: list[str]) -> None:
    headers = ["system", *(title for title, _, _ in columns_of(summaries))]
    widths = [max(len(headers[0]), *(len(name) for name in summaries))] + [len(title) for title in headers[1:]]
    print("\n" + "  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(headers, widths))))
    for row in table_rows(summaries):
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))))
    for name, figures in summaries.items():
        if figures["num_failed"]:
            print(f"WARNING: {figures['num_failed']} requests to {name} failed")
    print()
    for line in settings + acceptance(ratios):
        print(line)


def markdown_table(summaries: dict[str, dict[str, Any]], ratios: dict[str, float], settings: list[str]) -> str:
    headers = ["system", *(title for title, _, _ in columns_of(summaries))]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(summaries)]
    return "\n".join(lines + [""] + [f"- {line}" for line in settings + acceptance(ratios)]) + "\n"


def plot(results: list[SystemResult], path: Path, title: str) -> None:
    """Throughput bars for every system; TTFT and TPOT CDFs for the servers; single-stream TPOTs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (bars, ttft, tpot, single) = plt.subplots(1, 4, figsize=(20, 4.2))
    keys = ["output_tokens_per_s", "total_tokens_per_s"]
    width = 0.8 / len(results)
    for i, result in enumerate(results):
        figures = result.summary()
        xs = [k + (i - (len(results) - 1) / 2) * width for k in range(len(keys))]
        drawn = bars.bar(xs, [figures[key] for key in keys], width=width, label=result.name)
        bars.bar_label(drawn, fmt="%.0f", fontsize=8)
    bars.set_xticks(range(len(keys)), ["output tok/s", "total tok/s"])
    bars.set_ylabel("tokens / s")
    bars.legend(fontsize=8)
    for axis, metric in ((ttft, "ttft"), (tpot, "tpot")):
        for result in results:
            values = sorted(v * 1000 for r in result.requests if (v := getattr(r, f"{metric}_s")) is not None)
            if values:
                axis.plot(values, np.arange(1, len(values) + 1) / len(values), label=result.name,
                          drawstyle="steps-post")
        axis.set_xlabel(f"{metric.upper()} (ms)")
        axis.set_ylabel("fraction of requests")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    plot_single_stream(single, results)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_single_stream(axis: Any, results: list[SystemResult]) -> None:
    """One bar per server: the single-stream TPOT, ours / llama-server written above ours."""
    # Each system keeps its color of the other panels (its index in `results`).
    measured = {r.name: (r.single_stream.tpot_s * 1000, f"C{i}") for i, r in enumerate(results)
                if r.single_stream is not None and r.single_stream.tpot_s is not None}
    if not measured:
        axis.set_axis_off()
        return
    drawn = axis.bar(list(measured), [tpot for tpot, _ in measured.values()],
                     color=[color for _, color in measured.values()])
    axis.bar_label(drawn, fmt="%.1f", fontsize=8)
    if "our server" in measured and "llama-server" in measured:
        ratio = measured["our server"][0] / measured["llama-server"][0]
        axis.set_title(f"ours / llama-server = {ratio:.2f}", fontsize=9)
    num_tokens = next(r.single_stream.num_output_tokens for r in results if r.name in measured)
    axis.set_ylabel(f"single-stream TPOT (ms), {num_tokens} tokens")


def save(args: argparse.Namespace, results: list[SystemResult], extra: dict[str, Any]) -> None:
    summaries = {result.name: result.summary() for result in results}
    ratios = ratios_of(summaries)
    report = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "machine": machine(), **extra, "summaries": summaries, "ratios": ratios,
              "single_stream": {result.name: asdict(result.single_stream) for result in results
                                if result.single_stream is not None},
              "requests": {result.name: [asdict(r) for r in result.requests] for result in results if result.requests}}
    settings = setting_lines(report)
    print_report(summaries, ratios, settings)
    for name, single in report["single_stream"].items():
        if single["error"] is not None:
            print(f"WARNING: the single stream to {name} failed: {single['error']}")
    path = args.save_result
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    path.with_suffix(".md").write_text(markdown_table(summaries, ratios, settings))
    mask = report["machine"]["isa_mask"]
    title = (f"{args.num_prompts} ShareGPT requests, {args.concurrency} concurrent streams, "
             f"{args.output_len} output tokens, {report['machine']['cpu_model']}"
             f"{f' masked to {mask}' if mask else ''}, {report['machine']['cpu_count']} CPU cores, one run")
    plot(results, path.with_suffix(".png"), title)
    print(f"\nsaved {path}, {path.with_suffix('.md').name} and {path.with_suffix('.png').name}")


def main() -> None:
    args = parse_args()
    llm = build_engine(args)
    # One more than measured: the warm-up request, so that no measured prompt is cached beforehand.
    warmup_request, *requests = sample_sharegpt(
        llm.get_tokenizer(), args.num_prompts + 1, seed=args.seed, max_prompt_len=args.max_prompt_len,
        fixed_output_len=args.output_len, max_prompt_chars=args.max_prompt_chars)
    load_sharegpt.cache_clear()  # the parsed dataset (~200 MB) is not needed past sampling
    single_request = single_stream_request(llm.get_tokenizer(), [warmup_request, *requests],
                                           args.single_stream_tokens)
    results: list[SystemResult] = []
    setups: dict[str, dict[str, str | None]] = {}
    if not args.skip_offline:
        results.append(run_offline(llm, warmup_request, requests, args.output_len))
        setups["offline engine"] = engine_setup(llm)
    del llm  # free our weights and KV cache before the servers load theirs
    gc.collect()
    extra: dict[str, Any] = {"num_input_tokens": sum(r.prompt_len for r in requests), "setups": setups}
    # Server logs go beside the result (*.log is git-ignored): read them when a server fails to start.
    args.save_result.parent.mkdir(parents=True, exist_ok=True)
    log_stem = args.save_result.with_suffix("")
    ours_log = Path(f"{log_stem}.ours.log")
    ours = our_server(max_num_seqs=args.concurrency, dtype=args.dtype, weight_format=args.weight_format,
                      max_num_batched_tokens=args.max_num_batched_tokens, log_file=ours_log)
    results.append(run_against("our server", ours, warmup_request, requests, single_request, args,
                               fresh_connections=False))
    setups["our server"] = engine_setup_from_log(ours_log, args.dtype, args.weight_format)
    # One slot per stream, each holding the longest allowed prompt plus its output (and the single stream).
    slot_len = max(args.max_prompt_len + args.output_len, single_request.prompt_len + args.single_stream_tokens)
    llama_server = llama_server_from_args(args, num_slots=args.concurrency, ctx_size=args.concurrency * slot_len,
                                          log_file=Path(f"{log_stem}.llama-server.log"))
    if llama_server is not None:
        extra["llama_server"] = {"version": llama_server_version(args.llama_server), "command": llama_server.command}
        results.append(run_against("llama-server", llama_server, warmup_request, requests, single_request, args,
                                   fresh_connections=True))
    save(args, results, extra)


if __name__ == "__main__":
    main()
