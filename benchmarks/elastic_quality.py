"""Quality of the elastic levels (issue #13), measured with the fp32 torch model
(engine/elastic/torch_model.py, equal to the engine's fp32 logits within 1e-4).

Per level, on held-out ShareGPT answers (the protocol and conversations of
benchmarks/weight_formats.py: first exchange through the chat template, only answer tokens
scored, records past the calibration shuffle's first 2,000):

- perplexity of the answers, teacher-forced;
- top-1 agreement: the fraction of scored positions where the level's argmax equals the full
  model's;
- the FLOP fraction (ElasticSpec.flop_fraction at context 0 and 512).

Variants (--variants):
    taylor       Taylor ordering and allocation, anchors, training-free
    recovery     the same + closed-form recovery (bias + rank-r ridge correction): the checkpoint
    random       random neuron and head orders with the same per-layer widths (baseline)
    no-anchors   Taylor ordering, no anchor layers, at the same multiply-adds per level (baseline)
    distilled    recovery, then each level's terms distilled from the full model
                 (engine/elastic/distill.py, `engine elastify --distill`; --distill-budget-s a level,
                 resumable: adapters.safetensors under --work-dir); not in the default variants

Elastification runs through engine.elastic.elastify with the given sizes (stages cached under
--work-dir, so reruns with other variants reuse them).

    .venv/bin/python benchmarks/elastic_quality.py
    .venv/bin/python benchmarks/elastic_quality.py --num-conversations 8 --variants taylor,recovery   # quick
    .venv/bin/python benchmarks/elastic_quality.py --variants recovery,distilled   # ~5 min a level more

Writes --save-result (JSON), a markdown table beside it (.md) and a PNG (.png).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from engine.elastic import calibration, quality
from engine.elastic.allocation import AllocationConfig, allocate_levels
from engine.elastic.elastify import ElastifyConfig, compute_artifacts
from engine.elastic.importance import ffn_orders, head_orders, random_importance
from engine.elastic.spec import FULL_LEVEL, ElasticSpec
from engine.elastic.torch_model import prefix_submodel
from peers.machine import machine, machine_lines

REPO_ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("taylor", "recovery", "random", "no-anchors", "distilled")
DEFAULT_VARIANTS = VARIANTS[:4]  # distilled trains for minutes a level: asked for by name
RECOVERED_VARIANTS = ("recovery", "distilled")  # held to the acceptance targets
# Issue #13's acceptance, with recovery: perplexity at most / top-1 agreement at least.
TARGET_PERPLEXITY = {90: 5.8, 80: 7.5, 70: 11.0}
TARGET_AGREEMENT = {90: 0.80, 80: 0.70, 70: 0.60}
TARGET_LOWEST = (20.0, 0.45)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS))
    parser.add_argument("--levels", default=None, help="comma-separated, from 100 (default: elastify's)")
    parser.add_argument("--num-conversations", type=int, default=32)
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--importance-sequences", type=int, default=None)
    parser.add_argument("--recovery-sequences", type=int, default=None)
    parser.add_argument("--calibration-len", type=int, default=None, help="calibration tokens per conversation")
    parser.add_argument("--rank", type=int, default=None)
    parser.add_argument("--ridge", type=float, default=None)
    parser.add_argument("--target", default=None, help="recovery target: full_inputs, own_inputs, full_stream")
    parser.add_argument("--uniform", action="store_true", help="uniform allocation instead of per-layer")
    parser.add_argument("--no-normalise", action="store_true")
    parser.add_argument("--no-head-pruning", action="store_true")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/elastic-quality"))
    parser.add_argument("--seed", type=int, default=0, help="of the random-ordering baseline")
    parser.add_argument("--distill-budget-s", type=float, default=None, help="distilled: wall clock a level (300)")
    parser.add_argument("--save-result", type=Path, default=REPO_ROOT / "benchmarks/results/elastic_quality.json")
    args = parser.parse_args()
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if unknown := [v for v in args.variants if v not in VARIANTS]:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    return args


def elastify_config(args: argparse.Namespace) -> ElastifyConfig:
    config = ElastifyConfig()
    sizes: dict[str, Any] = {}
    if args.levels:
        sizes["level_values"] = tuple(int(v) for v in args.levels.split(","))
    if args.importance_sequences:
        sizes["num_importance_sequences"] = args.importance_sequences
    if args.recovery_sequences:
        sizes["num_recovery_sequences"] = args.recovery_sequences
    if args.calibration_len:
        sizes["max_seq_len"] = args.calibration_len
    recovery = {k: v for k, v in (("rank", args.rank), ("ridge", args.ridge), ("target", args.target)) if v is not None}
    allocation = replace(config.allocation, per_layer=not args.uniform, normalise=not args.no_normalise,
                         prune_heads=not args.no_head_pruning)
    return replace(config, **sizes, recovery=replace(config.recovery, **recovery), allocation=allocation)


def no_anchor_levels(artifacts: Any, allocation: AllocationConfig) -> tuple[Any, ...]:
    """Every layer prunable, each level at the multiply-adds the anchored level keeps."""
    spec: ElasticSpec = artifacts.spec
    num_anchors, num_layers = len(spec.anchor_layers), spec.num_layers
    budgets = tuple((num_anchors + (num_layers - num_anchors) * v / FULL_LEVEL) / num_layers
                    for v in spec.level_values)
    arch = artifacts.model.config
    return allocate_levels(arch, artifacts.importance, artifacts.ffn_orders, artifacts.head_orders, (),
                           spec.level_values, allocation, budgets)


def random_orders(spec: ElasticSpec, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    importance = random_importance(spec.num_layers, spec.intermediate_size, spec.num_heads, seed)
    return ffn_orders(importance), head_orders(importance, spec.num_kv_heads)


def measure_variants(args: argparse.Namespace, artifacts: Any, config: ElastifyConfig) -> dict[str, Any]:
    model, spec = artifacts.model, artifacts.spec
    held_out = calibration.heldout_answer_sequences(args.num_conversations, max_seq_len=args.max_seq_len)
    batches = list(calibration.batches(held_out, args.batch_size, answers_only=True))
    reference = quality.reference_top1(model, batches)
    full = quality.measure(model, batches, reference)
    orders = {"taylor": (artifacts.ffn_orders, artifacts.head_orders), "recovery": (artifacts.ffn_orders,
              artifacts.head_orders), "random": random_orders(spec, args.seed),
              "no-anchors": (artifacts.ffn_orders, artifacts.head_orders),
              "distilled": (artifacts.ffn_orders, artifacts.head_orders)}
    levels = {name: spec.levels for name in VARIANTS}
    if "no-anchors" in args.variants:
        levels["no-anchors"] = no_anchor_levels(artifacts, config.allocation)
    results: dict[str, Any] = {"full": asdict(full), "variants": {}}
    distilled = distilled_corrections(args, artifacts) if "distilled" in args.variants else {}
    if distilled:
        results["distillation"] = distilled.pop("reports")
    jobs = [(name, index) for name in args.variants for index in range(1, len(spec.levels))]
    for name, index in tqdm(jobs, desc="levels"):
        level = levels[name][index]
        submodel = prefix_submodel(level, *orders[name], spec.num_kv_heads)
        corrections = {"recovery": artifacts.corrections, "distilled": distilled}.get(name, {}).get(level.level)
        measured = quality.measure(model, batches, reference, submodel, corrections)
        results["variants"].setdefault(name, {})[level.level] = asdict(measured)
    return results


def distilled_corrections(args: argparse.Namespace, artifacts: Any) -> dict[Any, Any]:
    """Distil the checkpoint (written to --work-dir, as `engine elastify` writes it) the way
    `engine elastify --distill` does; level -> its distilled corrections, and "reports"."""
    from engine.elastic.adapters import level_corrections, load_adapters
    from engine.elastic.checkpoint import ElasticCheckpoint, checkpoint_digest, save_checkpoint
    from engine.elastic.distill import DistillConfig, distill_checkpoint

    save_checkpoint(args.work_dir, ElasticCheckpoint(artifacts.spec, artifacts.ffn_orders, artifacts.head_orders,
                                                     artifacts.corrections))
    budget = {} if args.distill_budget_s is None else {"budget_s": args.distill_budget_s}
    distill_checkpoint(args.model, args.work_dir, DistillConfig(**budget))
    stored = load_adapters(args.work_dir, checkpoint_digest(args.work_dir))
    assert stored is not None, "distillation wrote no adapters"
    num_layers = artifacts.spec.num_layers
    return {"reports": stored.reports, **{level: level_corrections(level, stored.tensors, num_layers)
                                          for level in stored.reports}}


def table(results: dict[str, Any], spec: ElasticSpec) -> tuple[list[str], list[list[str]]]:
    variants = list(results["variants"])
    headers = ["level", "FLOPs (ctx 0 / 512)"] + [f"{v} ppl / top-1" for v in variants]
    full = results["full"]
    rows = [["100", "1.000 / 1.000"] + [f"{full['perplexity']:.2f} / 100%"] * len(variants)]
    for value in spec.level_values[1:]:
        flops = f"{spec.flop_fraction(value):.3f} / {spec.flop_fraction(value, 512):.3f}"
        cells = [f"{results['variants'][v][value]['perplexity']:.2f} / "
                 f"{results['variants'][v][value]['top1_agreement']:.0%}" for v in variants]
        rows.append([str(value), flops] + cells)
    return headers, rows


def acceptance(results: dict[str, Any], spec: ElasticSpec) -> list[str]:
    lines = []
    lowest = spec.level_values[-1]
    targets = {**{v: (TARGET_PERPLEXITY[v], TARGET_AGREEMENT[v]) for v in TARGET_PERPLEXITY}, lowest: TARGET_LOWEST}
    for variant in RECOVERED_VARIANTS:
        recovered = results["variants"].get(variant, {})
        for value, (max_ppl, min_agree) in sorted(targets.items(), reverse=True):
            if value not in recovered:
                continue
            got = recovered[value]
            ok = got["perplexity"] <= max_ppl and got["top1_agreement"] >= min_agree
            lines.append(f"level {value}, {variant}: perplexity {got['perplexity']:.2f} (target <= {max_ppl}), top-1 "
                         f"{got['top1_agreement']:.0%} (target >= {min_agree:.0%}): {'meets' if ok else 'MISSES'}")
    return lines


def distillation_lines(results: dict[str, Any]) -> list[str]:
    return [f"distilled level {level}: {r['num_steps']} steps, {r['num_tokens']:,} tokens in {r['seconds']:.0f} s "
            f"(stopped by {r['stopped_by']}), probe KL {r['probe_kl_before']:.3f} -> {r['probe_kl_after']:.3f}"
            for level, r in sorted(results.get("distillation", {}).items(), key=lambda item: -int(item[0]))]


def plot(results: dict[str, Any], spec: ElasticSpec, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ppl, agree) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, per_level in results["variants"].items():
        values = [FULL_LEVEL] + [v for v in spec.level_values[1:] if v in per_level]
        flops = [spec.flop_fraction(v) for v in values]
        ppl.plot(flops, [results["full"]["perplexity"]] + [per_level[v]["perplexity"] for v in values[1:]], "o-",
                 label=name)
        agree.plot(flops, [1.0] + [per_level[v]["top1_agreement"] for v in values[1:]], "o-", label=name)
    ppl.set_yscale("log")
    ppl.set_xlabel("FLOP fraction (context 0)")
    ppl.set_ylabel("held-out answer perplexity")
    agree.set_xlabel("FLOP fraction (context 0)")
    agree.set_ylabel("top-1 agreement with the full model")
    ppl.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    config = elastify_config(args)
    started = time.perf_counter()
    artifacts = compute_artifacts(args.model, config, args.work_dir)
    elastify_seconds = time.perf_counter() - started
    results = measure_variants(args, artifacts, config)
    spec = artifacts.spec
    headers, rows = table(results, spec)
    info = machine()
    lines = machine_lines(info) + [
        f"held out: {args.num_conversations} ShareGPT answers (records past the calibration shuffle's first 2,000), "
        f"{results['full']['num_scored']} scored tokens, sequences of at most {args.max_seq_len} tokens",
        f"elastify settings: {json.dumps(asdict(config), default=str)}",
        f"anchors: {list(spec.anchor_layers)}; elastify (or its cached stages) took {elastify_seconds:.0f} s",
    ] + distillation_lines(results) + acceptance(results, spec)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    print("\n" + "  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    print("\n".join([""] + lines))
    path = args.save_result
    path.parent.mkdir(parents=True, exist_ok=True)
    report = {"args": {k: str(v) for k, v in vars(args).items()}, "machine": info, "spec": json.loads(spec.to_json()),
              **results}
    path.write_text(json.dumps(report, indent=1) + "\n")
    markdown = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    markdown += ["| " + " | ".join(row) + " |" for row in rows]
    path.with_suffix(".md").write_text("\n".join(markdown + [""] + [f"- {line}" for line in lines]) + "\n")
    plot(results, spec, path.with_suffix(".png"), f"elastic levels, {info['cpu_model']}")
    print(f"\nsaved {path}, {path.with_suffix('.md').name} and {path.with_suffix('.png').name}")


if __name__ == "__main__":
    main()
