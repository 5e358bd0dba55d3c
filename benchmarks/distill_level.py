"""Distil one level of the served elastic checkpoint again, from its closed-form terms, and measure
its held-out quality beside the checkpoint's stored (distilled) and closed-form terms.

What it is for: A/B a distillation setting on one level without rewriting the checkpoint's
adapters (`engine elastify --distill` writes those).  Quality is the fp32 torch model's
(engine/elastic/quality.py) on the held-out ShareGPT answers of benchmarks/elastic.py (32
conversations by default), so every row of one run is one measurement; the served figures
(benchmarks/elastic.py, bf16 on the engine's kernels) differ from these by tenths.

    .venv/bin/python benchmarks/distill_level.py --level 40                  # today's defaults
    .venv/bin/python benchmarks/distill_level.py --level 40 --max-steps 300  # the cap before 2026-12-07
    .venv/bin/python benchmarks/distill_level.py --level 40 --answers-only   # train on answer tokens only
    .venv/bin/python benchmarks/distill_level.py --level 40 --learning-rate 6e-3 --batch-size 4
"""

from __future__ import annotations

import argparse
from dataclasses import asdict

from engine.elastic import calibration
from engine.elastic.checkpoint import elastic_cache_dir, load_checkpoint
from engine.elastic.distill import DistillConfig, LevelTask, Teacher, calibration_batches, distill_level
from engine.elastic.quality import Quality, measure, reference_top1
from engine.elastic.torch_model import TorchLlama, prefix_submodel
from engine.model.loader import resolve_model


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a GGUF file (default: the default model)")
    parser.add_argument("--level", type=int, default=40)
    parser.add_argument("--budget-s", type=float, default=DistillConfig.budget_s)
    parser.add_argument("--max-steps", type=int, default=None, help="cap the level's steps (default: none)")
    parser.add_argument("--learning-rate", type=float, default=DistillConfig.learning_rate)
    parser.add_argument("--batch-size", type=int, default=DistillConfig.batch_size, help="sequences a step")
    parser.add_argument("--answers-only", action="store_true",
                        help="score only answer tokens in training (the default scores every token after the first)")
    parser.add_argument("--num-conversations", type=int, default=32, help="held-out conversations to measure on")
    return parser.parse_args()


def line(name: str, quality: Quality, full: Quality) -> str:
    return (f"| {name} | {quality.perplexity:.2f} ({quality.perplexity / full.perplexity:.3f}x) | "
            f"{100 * quality.top1_agreement:.1f}% |")


def main() -> None:
    args = parse_args()
    model = TorchLlama.load(args.model)
    tokenizer = calibration.default_tokenizer(args.model)
    held_out = list(calibration.batches(calibration.heldout_answer_sequences(args.num_conversations, tokenizer), 4,
                                        answers_only=True))
    reference = reference_top1(model, held_out)
    full = measure(model, held_out, reference)
    directory = elastic_cache_dir(resolve_model(args.model).path)
    stored, closed = load_checkpoint(directory), load_checkpoint(directory, with_adapters=False)
    spec = closed.spec
    level = next(lv for lv in spec.levels if lv.level == args.level)
    submodel = prefix_submodel(level, closed.ffn_orders, closed.head_orders, spec.num_kv_heads)
    config = DistillConfig(budget_s=args.budget_s, max_steps=args.max_steps, learning_rate=args.learning_rate,
                           batch_size=args.batch_size)
    conversations = calibration.calibration_sequences(tokenizer, config.num_conversations, config.seq_len)
    batches = calibration_batches(conversations, config.batch_size, config.seed, args.answers_only)
    corrections, report = distill_level(model, LevelTask(args.level, submodel, closed.corrections[args.level]),
                                        batches[:-1], batches[-1], Teacher(model, config.top_k), config)
    setting = (f"max_steps {args.max_steps}, learning rate {args.learning_rate:g}, batch {args.batch_size}, "
               f"{'answers only' if args.answers_only else 'every token'}")
    print(f"\nlevel {args.level} distilled again ({setting}): {asdict(report)}\n")
    print(f"| terms at level {args.level} | perplexity (x full {full.perplexity:.2f}) | top-1 agreement |")
    print("|---|---|---|")
    print(line("closed-form", measure(model, held_out, reference, submodel, closed.corrections[args.level]), full))
    print(line("stored adapters", measure(model, held_out, reference, submodel, stored.corrections[args.level]), full))
    print(line(f"distilled here ({report.num_steps} steps)", measure(model, held_out, reference, submodel, corrections),
               full))
    print(f"\n{full.num_scored} held-out answer tokens; fp32 torch model")


if __name__ == "__main__":
    main()
