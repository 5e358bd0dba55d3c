"""Elastic submodels as served (issue #13's report): quality per level and recovery variant through
the engine itself, then speed per level (benchmarks/elastic_speed.py).

Quality is measured on the model the server runs (the engine's default dtype and weight format
on this CPU), through vLLM-style prompt logprobs:

- perplexity of held-out ShareGPT answers (benchmarks/weight_formats.py's conversations and
  protocol: first exchange in the chat template, answer tokens scored);
- teacher-forced top-1 agreement: where the level's most likely next token equals the full model's;
- greedy agreement: of --num-prompts prompts, how many 32-token greedy continuations equal the
  full model's exactly (and the mean agreeing prefix).

Variants, each an elastic checkpoint directory written beside the cached one:

    training-free  Taylor ordering and per-layer widths, no recovery terms
    closed-form    + bias compensation and the rank-8 least-squares side paths
    distilled      + the distilled side paths (when `engine elastify --distill` has run)
    random         random neuron and head orders, the same widths, no recovery (baseline)

    .venv/bin/python benchmarks/elastic.py
    .venv/bin/python benchmarks/elastic.py --num-conversations 8 --num-prompts 8 --skip-speed   # quick

Writes --save-result (JSON), a markdown table beside it (.md) and a PNG (.png).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import shutil
import sys
from pathlib import Path

from tqdm import tqdm

from engine import LLM, SamplingParams
from engine.bench.conversations import Conversation
from engine.elastic import calibration
from engine.elastic.checkpoint import (
    ADAPTERS_FILE,
    ElasticCheckpoint,
    elastic_cache_dir,
    load_checkpoint,
    save_checkpoint,
)
from engine.elastic.importance import ffn_orders, head_orders, random_importance
from engine.elastic.quality_table import DEFAULT_QUALITY, QualityTable
from engine.model.loader import resolve_model
from peers.machine import machine, machine_lines

RESULTS = Path(__file__).parent / "results"
VARIANTS = ("training-free", "closed-form", "distilled", "random")
# Issue #13's acceptance with recovery: perplexity at most, top-1 agreement at least.
TARGETS = {90: (5.8, 0.80), 80: (7.5, 0.70), 70: (11.0, 0.60)}
TARGET_LOWEST = (20.0, 0.45)
GREEDY_TOKENS = 32


def variant_checkpoint(base: Path, variant: str, work_dir: Path, seed: int) -> Path | None:
    """The variant's checkpoint directory (None: distilled without adapters)."""
    checkpoint = load_checkpoint(base)
    if variant == "distilled":
        return base if (base / ADAPTERS_FILE).is_file() else None
    if variant == "training-free":
        checkpoint = dataclasses.replace(checkpoint, corrections={})
    elif variant == "random":
        spec = checkpoint.spec
        importance = random_importance(spec.num_layers, spec.intermediate_size, spec.num_heads, seed)
        checkpoint = ElasticCheckpoint(spec, ffn_orders(importance), head_orders(importance, spec.num_kv_heads), {})
    elif variant == "closed-form":  # the checkpoint's own terms, without the distilled adapters
        checkpoint = load_checkpoint(base, with_adapters=False)
    directory = work_dir / variant
    shutil.rmtree(directory, ignore_errors=True)
    save_checkpoint(directory, checkpoint)
    return directory


def answer_scores(llm: LLM, conversations: list[Conversation], level: int) -> tuple[float, int, list[list[int]]]:
    """(summed NLL of the answer tokens, their count, per conversation the top-1 token at each
    scored position) through prompt logprobs."""
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1)
    outputs = llm.generate([{"prompt_token_ids": c.token_ids} for c in conversations], params, use_tqdm=False,
                           elastic_level=level)
    nll, count, top1 = 0.0, 0, []
    for conversation, output in zip(conversations, outputs):
        first = len(conversation.prompt_token_ids)
        positions = range(first, len(conversation.token_ids))
        entries = [output.prompt_logprobs[p] for p in positions]
        nll -= sum(entry[conversation.token_ids[p]].logprob for p, entry in zip(positions, entries))
        count += len(entries)
        top1.append([next(t for t, lp in entry.items() if lp.rank == 1) for entry in entries])
    return nll, count, top1


def greedy(llm: LLM, prompts: list[list[int]], level: int) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=GREEDY_TOKENS, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False, elastic_level=level)
    return [o.outputs[0].token_ids for o in outputs]


def measure_variant(directory: Path, conversations: list[Conversation], prompts: list[list[int]]) -> dict:
    llm = LLM(elastic_checkpoint=str(directory), kv_cache_memory=0.5)
    levels = llm.engine.elastic_levels
    _, _, full_top1 = answer_scores(llm, conversations, levels[0])
    full_greedy = greedy(llm, prompts, levels[0])
    rows = {}
    for level in tqdm(levels, desc=directory.name, leave=False):
        nll, count, top1 = answer_scores(llm, conversations, level)
        agree = sum(a == b for mine, full in zip(top1, full_top1) for a, b in zip(mine, full))
        continuations = greedy(llm, prompts, level) if level != levels[0] else full_greedy
        prefixes = [_agreeing_prefix(mine, full) for mine, full in zip(continuations, full_greedy)]
        rows[level] = {"perplexity": math.exp(nll / count), "top1_agreement": agree / count, "scored_tokens": count,
                       "greedy_identical": sum(p == GREEDY_TOKENS for p in prefixes),
                       "greedy_mean_prefix": sum(prefixes) / len(prefixes)}
    setup = {"dtype": llm.engine.runner.dtype_name, "weight_format": llm.engine.runner.plan.weights_label}
    flops = {level: llm.engine.runner.elastic_spec.flop_fraction(level) for level in levels}
    del llm
    gc.collect()
    return {"levels": rows, "setup": setup, "flop_fraction": flops}


def _agreeing_prefix(mine: list[int], full: list[int]) -> int:
    return next((i for i, (a, b) in enumerate(zip(mine, full)) if a != b), min(len(mine), len(full)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--num-conversations", type=int, default=32)
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0, help="of the random-ordering baseline")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/elastic-variants"))
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--save-result", type=Path, default=RESULTS / "elastic.json")
    args = parser.parse_args()
    base = elastic_cache_dir(resolve_model(None).path)
    LLM(elastic="on").engine.runner  # builds the checkpoint if missing (progress shown), then frees it
    gc.collect()
    conversations = calibration.heldout_answer_sequences(args.num_conversations)
    prompts = [c.prompt_token_ids for c in calibration.heldout_answer_sequences(args.num_prompts)]
    results = {}
    for variant in args.variants.split(","):
        directory = variant_checkpoint(base, variant, args.work_dir, args.seed)
        if directory is None:
            print(f"{variant}: no adapters yet (run `engine elastify --distill`); skipped")
            continue
        results[variant] = measure_variant(directory, conversations, prompts)
    report(results, args)
    save_quality_table(base, results)
    if not args.skip_speed:
        sys.argv = [sys.argv[0], "--save-result", str(args.save_result.with_name("elastic_speed.json"))]
        import elastic_speed

        elastic_speed.main()


def save_quality_table(base: Path, results: dict) -> None:
    """The served checkpoint's measured quality table (engine/elastic/quality_table.py), which the
    SLO policy ranks levels by: the variant `base` serves, distilled where its adapters are there,
    else its closed-form terms."""
    served = "distilled" if (base / ADAPTERS_FILE).is_file() else "closed-form"
    if served not in results:
        return
    levels = results[served]["levels"]
    full = levels[max(levels)]["perplexity"]
    ratios = {int(level): max(1.0, row["perplexity"] / full) for level, row in levels.items()}
    table = QualityTable(ratios, DEFAULT_QUALITY.retrieval_ratio,
                         source=f"benchmarks/elastic.py, {served} recovery, {machine()['cpu']}")
    print(f"quality table of the served checkpoint ({served}) -> {table.save(base)}")


def report(results: dict, args: argparse.Namespace) -> None:
    any_variant = next(iter(results.values()))
    levels = list(any_variant["levels"])
    lines = [*machine_lines(machine()), f"engine: {any_variant['setup']}", "",
             "| level | FLOP fraction | " + " | ".join(f"{v} ppl / top-1 / greedy" for v in results) + " |",
             "|---|---|" + "---|" * len(results)]
    for level in levels:
        cells = []
        for variant in results.values():
            row = variant["levels"][level]
            cells.append(f"{row['perplexity']:.2f} / {100 * row['top1_agreement']:.0f}% / "
                         f"{row['greedy_identical']} ({row['greedy_mean_prefix']:.1f})")
        lines.append(f"| {level} | {any_variant['flop_fraction'][level]:.3f} | " + " | ".join(cells) + " |")
    lines += ["", f"{args.num_conversations} held-out conversations "
                  f"({any_variant['levels'][levels[0]]['scored_tokens']} answer tokens); greedy: identical "
                  f"{GREEDY_TOKENS}-token continuations of {args.num_prompts} prompts (mean agreeing prefix)"]
    text = "\n".join(lines)
    print(text)
    args.save_result.parent.mkdir(parents=True, exist_ok=True)
    args.save_result.write_text(json.dumps(results, indent=1, default=str))
    args.save_result.with_suffix(".md").write_text(text + "\n")
    plot(results, args.save_result.with_suffix(".png"))


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (ppl_axis, top1_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for name, variant in results.items():
        fractions = [variant["flop_fraction"][lv] for lv in variant["levels"]]
        ppl_axis.plot(fractions, [r["perplexity"] for r in variant["levels"].values()], "o-", label=name)
        top1_axis.plot(fractions, [100 * r["top1_agreement"] for r in variant["levels"].values()], "o-", label=name)
    ppl_axis.set(xlabel="FLOP fraction of the full model", ylabel="held-out perplexity", yscale="log")
    top1_axis.set(xlabel="FLOP fraction of the full model", ylabel="top-1 agreement with the full model (%)")
    ppl_axis.legend()
    figure.suptitle("Elastic levels as served: quality against cost")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
