"""Prompt pruning: accuracy on the long-context retrieval tasks and TTFT, at each prompt_keep,
with the model's attention choosing the kept tokens beside random dropping at the same ratios
(the same mechanism, `prompt_scoring="random"`).

Accuracy: every task x filler x length cell gets its seeded set (engine/bench/retrieval_tasks.py),
answered greedily.  Each sample runs at keep 1.0 first; its other variants (every keep x scoring)
then run together and reuse its group-A KV from the prefix cache up to the scoring window (group
A does not depend on pruning), so a sample costs little more than one full prefill.
TTFT: one request at a time on an engine with prefix caching off, the keeps interleaved on
distinct prompts of --ttft-length tokens (so machine noise hits them alike), scoring included;
reported as the median ratio to keep 1.0 over --ttft-repeats rounds.

    .venv/bin/python benchmarks/prompt_pruning.py                                   # the full report
    .venv/bin/python benchmarks/prompt_pruning.py --tasks passkey --fillers repeat --lengths 2048 \
        --num-samples 30 --skip-ttft                                                 # one cell
    .venv/bin/python benchmarks/prompt_pruning.py --skip-accuracy --ttft-repeats 5  # TTFT only

Writes benchmarks/results/prompt_pruning.md and .png (and the raw figures as .json, not committed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from tqdm import tqdm

from engine import LLM, SamplingParams
from engine.bench.retrieval_tasks import FILLERS, TASKS, RetrievalSample, make_task_set
from engine.config import PromptPruningConfig
from engine.prompt_pruning import parse_prune_layers

REPO_ROOT = Path(__file__).resolve().parent.parent
KEEPS = (1.0, 0.7, 0.5, 0.3, 0.2)
SCORINGS = ("attention", "random")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="passkey,niah_single", help=f"comma-separated, of {', '.join(TASKS)}")
    parser.add_argument("--fillers", default=",".join(FILLERS), help=f"comma-separated, of {', '.join(FILLERS)}")
    parser.add_argument("--lengths", default="1024,2048,4096")
    parser.add_argument("--keeps", default=",".join(map(str, KEEPS)))
    parser.add_argument("--num-samples", type=int, default=30)
    parser.add_argument("--num-samples-long", type=int, default=20, help="samples of 4096-token cells")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prune-layers", type=parse_prune_layers, default=None,
                        help="l_1,l_2,... (one layer: one stage; default: the engine's)")
    parser.add_argument("--score-window", type=int, default=PromptPruningConfig.score_window)
    parser.add_argument("--num-score-layers", type=int, default=PromptPruningConfig.num_score_layers)
    parser.add_argument("--pool-size", type=int, default=PromptPruningConfig.pool_size)
    parser.add_argument("--window", type=int, default=PromptPruningConfig.window)
    parser.add_argument("--max-num-batched-tokens", type=int, default=512)
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--skip-ttft", action="store_true")
    parser.add_argument("--ttft-length", type=int, default=2048)
    parser.add_argument("--ttft-repeats", type=int, default=5)
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "benchmarks/results/prompt_pruning")
    args = parser.parse_args()
    args.tasks = args.tasks.split(",")
    args.fillers = args.fillers.split(",")
    args.lengths = [int(x) for x in args.lengths.split(",")]
    args.keeps = [float(x) for x in args.keeps.split(",")]
    return args


def pruning_config(args: argparse.Namespace) -> PromptPruningConfig:
    return PromptPruningConfig(prune_layers=args.prune_layers, num_score_layers=args.num_score_layers,
                               pool_size=args.pool_size, window=args.window, score_window=args.score_window)


def variants(keeps: list[float]) -> list[tuple[float, str]]:
    """(keep, scoring) pairs after keep 1.0 (where the scoring does not matter)."""
    return [(keep, scoring) for keep in keeps if keep < 1 for scoring in SCORINGS]


def run_sample(llm: LLM, sample: RetrievalSample, keeps: list[float]) -> dict[str, float]:
    """Scores of one sample at keep 1.0, then at every other (keep, scoring), each run alone as
    keep 1.0 is (batched together, bf16 rounding differs with the batch's chunking and flipped a
    borderline sample either way)."""
    params = SamplingParams(temperature=0.0, max_tokens=sample.max_tokens)
    scores = {}
    for keep, scoring in [(1.0, "attention")] + variants(keeps):
        output = llm.generate(sample.prompt, params, use_tqdm=False, prompt_keep=keep, prompt_scoring=scoring)[0]
        scores["1.0" if keep == 1 else f"{keep}/{scoring}"] = sample.score(output.outputs[0].text)
    return scores


def accuracy(args: argparse.Namespace) -> list[dict]:
    llm = LLM(max_num_batched_tokens=args.max_num_batched_tokens, prompt_pruning=pruning_config(args),
              max_model_len=max(args.lengths) + 64)
    tokenizer = llm.get_tokenizer()
    cells = []
    for task in args.tasks:
        for filler in args.fillers:
            for length in args.lengths:
                num_samples = args.num_samples_long if length >= 4096 else args.num_samples
                samples = make_task_set(task, filler, length, num_samples, args.seed, tokenizer=tokenizer)
                per_sample = [run_sample(llm, sample, args.keeps)
                              for sample in tqdm(samples, desc=f"{task} {filler} {length}")]
                cell = {"task": task, "filler": filler, "length": length, "num_samples": num_samples,
                        "accuracy": {key: statistics.fmean(s[key] for s in per_sample) for key in per_sample[0]}}
                print(json.dumps(cell), flush=True)
                cells.append(cell)
    return cells


def ttft(args: argparse.Namespace) -> dict:
    """Median TTFT per (keep, scoring) and its median ratio to keep 1.0 within each round."""
    llm = LLM(max_num_batched_tokens=args.max_num_batched_tokens, prompt_pruning=pruning_config(args),
              enable_prefix_caching=False, max_model_len=args.ttft_length + 64)
    samples = make_task_set("passkey", "sharegpt", args.ttft_length, args.ttft_repeats + 1, args.seed + 1,
                            tokenizer=llm.get_tokenizer())
    keys = [(1.0, "attention")] + [(keep, "attention") for keep in args.keeps if keep < 1] + [(0.3, "random")]
    params = SamplingParams(temperature=0.0, max_tokens=1)
    llm.generate(samples[0].prompt, params, use_tqdm=False)  # warm-up: first-use costs stay out
    times: dict[str, list[float]] = {f"{k}/{s}": [] for k, s in keys}
    for sample in tqdm(samples[1:], desc=f"TTFT at {args.ttft_length}"):
        for keep, scoring in keys:
            start = time.perf_counter()
            llm.generate(sample.prompt, params, use_tqdm=False, prompt_keep=keep, prompt_scoring=scoring)
            times[f"{keep}/{scoring}"].append(time.perf_counter() - start)
    full = times["1.0/attention"]
    return {key: {"median_s": statistics.median(t),
                  "ratio": statistics.median(x / f for x, f in zip(t, full))} for key, t in times.items()}


def markdown(args: argparse.Namespace, cells: list[dict], ttfts: dict | None) -> str:
    layers = ",".join(map(str, args.prune_layers)) if args.prune_layers else "default"
    lines = [f"# Prompt pruning (prune layers {layers}, score layers {args.num_score_layers}, "
             f"pool {args.pool_size}, window {args.window}, score window {args.score_window})", ""]
    if cells:
        keeps = [k for k in args.keeps if k < 1]
        header = "| task | filler | length | n | keep 1.0 | " + " | ".join(f"{k} attn / random" for k in keeps) + " |"
        lines += [header, "|" + "---|" * (5 + len(keeps))]
        for c in cells:
            acc = c["accuracy"]
            row = " | ".join(f"{acc[f'{k}/attention']:.2f} / {acc[f'{k}/random']:.2f}" for k in keeps)
            lines.append(f"| {c['task']} | {c['filler']} | {c['length']} | {c['num_samples']} | {acc['1.0']:.2f} | {row} |")
        lines.append("")
    if ttfts:
        lines += [f"TTFT at {args.ttft_length} tokens, one request at a time, scoring included "
                  f"({args.ttft_repeats} interleaved rounds):", "", "| keep / scoring | median TTFT (s) | ratio to keep 1.0 |",
                  "|---|---|---|"]
        lines += [f"| {key} | {v['median_s']:.2f} | {v['ratio']:.3f} |" for key, v in ttfts.items()]
    return "\n".join(lines) + "\n"


def plot(args: argparse.Namespace, cells: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, max(1, len(cells)), figsize=(4 * max(1, len(cells)), 3.2), squeeze=False)
    keeps = sorted(args.keeps)
    for ax, c in zip(axes[0], cells):
        acc = c["accuracy"]
        for scoring, style in (("attention", "o-"), ("random", "x--")):
            ax.plot(keeps, [acc["1.0"] if k == 1 else acc[f"{k}/{scoring}"] for k in keeps], style, label=scoring)
        ax.set_title(f"{c['task']} {c['filler']} {c['length']}", fontsize=9)
        ax.set_xlabel("prompt_keep")
        ax.set_ylim(-0.05, 1.05)
    axes[0][0].set_ylabel("accuracy")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    args = parse_args()
    cells = [] if args.skip_accuracy else accuracy(args)
    ttfts = None if args.skip_ttft else ttft(args)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    report = markdown(args, cells, ttfts)
    print(report)
    args.output.with_suffix(".md").write_text(report)
    args.output.with_suffix(".json").write_text(json.dumps({"cells": cells, "ttft": ttfts}, indent=1))
    if cells:
        plot(args, cells, args.output.with_suffix(".png"))


if __name__ == "__main__":
    main()
