"""Steps holding small prefill chunks: layer by layer against one C++ call a layer.

    .venv/bin/python benchmarks/one_call_steps.py          # about 1 minute

A step with a prefill chunk ran every decoder layer kernel by kernel; within
engine/model/layers/fused_decode.py's bounds (ONE_CALL_MAX_ROWS, the plan's dense threshold,
ONE_CALL_MAX_PREFILL_PAIRS) it now runs each layer as one call, a chunk's tokens attending in the
decode kernel.  This times `runner.execute` on synthetic steps (engine/profiling.py's: ragged
decode contexts, scattered KV blocks) both ways, alternating, and prints the median of each, with
whether the step is within the bounds.  The layer-by-layer figures set each layer's bounds to zero.
Writes benchmarks/results/one_call_steps.md.

    .venv/bin/python benchmarks/one_call_steps.py --deep --levels 100,40    # about 3 minutes

--deep sets ONE_CALL_MAX_PREFILL_PAIRS: small chunks deep in long prompts (8 or 16 tokens at
512-3,072 keys, alone and beside 10 decodes), at each of --levels, layer by layer against one call
with the pairs bound lifted (a level below 100 attends with fewer query heads in either way).
Writes benchmarks/results/one_call_deep_chunks.md.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from engine import LLM
from engine.elastic.spec import FULL_LEVEL
from engine.profiling import ProfileStep, decodes, prefill, ragged_decodes, time_profile_step
from engine.scheduler.cost_model import OneCallSteps

RESULTS = Path(__file__).parent / "results"


def steps() -> list[ProfileStep]:
    cases = [ProfileStep("16 decodes", ragged_decodes(16, 256))]
    for tokens, context in ((2, 0), (8, 256), (16, 256), (32, 256), (48, 0), (16, 1024), (16, 2048)):
        cases.append(ProfileStep(f"16 decodes + {tokens} tokens at {context}",
                                 (*ragged_decodes(16, 256), prefill(tokens, context, samples=tokens == 2))))
    cases += [ProfileStep("30 decodes + a 2-token prompt", (*ragged_decodes(30, 256), prefill(2))),
              ProfileStep("2 decodes", decodes(2, 64)),
              ProfileStep("a 2-token prompt", (prefill(2),)),
              ProfileStep("an 8-token prompt", (prefill(8),)),
              ProfileStep("a 32-token prompt", (prefill(32),)),
              ProfileStep("32 tokens at 512", (prefill(32, 512, samples=False),)),
              ProfileStep("32 tokens at 2,048", (prefill(32, 2048, samples=False),))]
    return cases


def deep_steps(max_rows: int) -> list[ProfileStep]:
    cases = []
    for num_decodes in (0, 10):
        for tokens in (8, 16):
            for context in (512, 1024, 1536, 2048, 3072):
                if num_decodes + tokens <= max_rows:
                    cases.append(ProfileStep(f"{num_decodes} decodes + {tokens} tokens at {context}",
                                             (*ragged_decodes(num_decodes, 256), prefill(tokens, context, samples=False))))
    return cases


def alternate(engine, fused: list, cases: list[ProfileStep], one_call: OneCallSteps, levels: list[int],
              rounds: int) -> dict[tuple[str, int, bool], list[float]]:
    """Seconds of each step at each level, layer by layer (every layer's bounds zero) and within
    `one_call`, the two ways alternating `rounds` times, 5 timings a step after a warm one."""
    timings: dict[tuple[str, int, bool], list[float]] = {}
    for _ in range(rounds):
        for level in levels:
            for within in (False, True):
                for layer in fused:
                    layer.limits = one_call if within else OneCallSteps(0, 0)
                for step in cases:
                    time_profile_step(engine, step, level)  # warm
                    timings.setdefault((step.name, level, within), []).extend(
                        time_profile_step(engine, step, level) for _ in range(5))
    return timings


def ratio_cells(timings: dict, name: str, level: int) -> str:
    before, after = (1000 * statistics.median(timings[(name, level, way)]) for way in (False, True))
    return f"{before:.2f} | {after:.2f} | {after / before:.2f} |"


def deep_chunks(engine, fused: list, limits: OneCallSteps, levels: list[int], rounds: int) -> str:
    """Layer by layer against one call with the pairs bound lifted, at each level."""
    cases = deep_steps(limits.max_rows)
    timings = alternate(engine, fused, cases, OneCallSteps(limits.max_rows, 10 ** 9), levels, rounds)
    lines = [f"# Small chunks deep in long prompts: layer by layer against one call, pairs bound lifted "
             f"({engine.runner.plan.weights_label}; the bound is {limits.max_prefill_pairs})", "",
             "| step | prefill pairs | level | layer by layer ms | one call ms | ratio |", "|---|---|---|---|---|---|"]
    lines += [f"| {step.name} | {step.features.num_prefill_attention_pairs} | {level} | {ratio_cells(timings, step.name, level)}"
              for level in levels for step in cases]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the two ways, 5 steps each")
    parser.add_argument("--deep", action="store_true", help="chunks deep in long prompts, the pairs bound lifted")
    parser.add_argument("--levels", default="100", help="elastic levels the --deep steps run at")
    args = parser.parse_args()
    llm = LLM(kv_cache_memory=0.25)
    engine = llm.engine
    limits = engine.runner.one_call_steps
    fused = [layer.fused_decode for layer in engine.runner.model.layers if layer.fused_decode is not None]
    if args.deep:
        text = deep_chunks(engine, fused, limits, [int(v) for v in args.levels.split(",")], args.rounds)
        print(text)
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "one_call_deep_chunks.md").write_text(text)
        return
    timings = alternate(engine, fused, steps(), limits, [FULL_LEVEL], args.rounds)
    lines = [f"# Steps with small prefill chunks: layer by layer against one call a layer ({engine.runner.plan.weights_label}, "
             f"bounds {limits})", "",
             "| step | rows | prefill pairs | within the bounds | layer by layer ms | one call ms | ratio |",
             "|---|---|---|---|---|---|---|"]
    for step in steps():
        features = step.features
        covered = "decodes only" if features.num_prefill_seqs == 0 else \
            "yes" if limits is not None and limits.covers(features) else "no"
        lines.append(f"| {step.name} | {features.num_scheduled_tokens} | {features.num_prefill_attention_pairs} | "
                     f"{covered} | {ratio_cells(timings, step.name, FULL_LEVEL)}")
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "one_call_steps.md").write_text(text)


if __name__ == "__main__":
    main()
