"""Elastic levels' speed on this CPU: decode tokens/s at 16 and 32 running requests per level,
prefill tokens/s per level, each level's FLOP fraction, and a step mixing every level against
what the uniform steps predict.

One engine serves every level (switching is free: each level is a prefix view of the same
weights), so all figures come from one process and one load.

    .venv/bin/python benchmarks/elastic_speed.py
    .venv/bin/python benchmarks/elastic_speed.py --batch-sizes 16 --decode-steps 8   # quick

Rounds: this VM's speed drifts by tens of percent within minutes, so every figure is the median of
`--rounds` passes, each pass measuring every level (and the mixed step) in turn: a slow minute
then lands on one pass of every level, not on all passes of one.

Mixed step: the batch's rows spread evenly over the levels.  Its FLOP prediction is the
row-weighted mean of the uniform steps' times at the same batch size (a step's time is linear in
its rows' multiply-adds when the rows count is fixed), and, for reference, the full model's step
time scaled by the rows' mean FLOP fraction.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from engine import LLM, SamplingParams
from peers.machine import engine_setup, machine, machine_lines, setup_line

RESULTS = Path(__file__).parent / "results"


@dataclass
class LevelSpeed:
    level: int
    flop_fraction: float
    decode_tok_s: dict[int, float]  # batch size -> output tokens/s
    prefill_tok_s: float


def prompt_tokens(llm: LLM, num_prompts: int, length: int) -> list[list[int]]:
    from decode_speed import text_tokens  # a benchmark sibling: real ShareGPT text

    text = text_tokens(llm.get_tokenizer(), num_prompts * 7 + length)
    return [text[7 * i: 7 * i + length] for i in range(num_prompts)]  # distinct prompts


def decode_step_seconds(llm: LLM, prompts: list[list[int]], levels: list[int], num_steps: int) -> float:
    """Mean seconds of a decode step with one running request per prompt, each at its level."""
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=num_steps + 64, ignore_eos=True)
    ids = [f"decode-{i}" for i in range(len(prompts))]
    for request_id, prompt, level in zip(ids, prompts, levels):
        engine.add_request(request_id, prompt, params, elastic_level=level)
    while engine.scheduler.waiting or any(r.num_output_tokens == 0 for r in engine.scheduler.running):
        engine.step()
    engine.step()  # warm-up at the final shapes
    start = time.perf_counter()
    for _ in range(num_steps):
        engine.step()
    elapsed = time.perf_counter() - start
    assert engine.scheduler.num_running == len(prompts), "a request finished or was preempted mid-measure"
    engine.abort_request(ids)
    engine.step()
    return elapsed / num_steps


def prefill_tok_s(llm: LLM, prompts: list[list[int]], level: int) -> float:
    params = SamplingParams(temperature=0.0, max_tokens=1)
    start = time.perf_counter()
    llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False, elastic_level=level)
    return sum(len(p) for p in prompts) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", default="16,32")
    parser.add_argument("--context", type=int, default=256, help="prompt tokens of each decoding request")
    parser.add_argument("--decode-steps", type=int, default=24)
    parser.add_argument("--prefill-prompts", type=int, default=4)
    parser.add_argument("--prefill-len", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved passes; figures are their medians")
    parser.add_argument("--elastic-checkpoint", default=None)
    parser.add_argument("--save-result", default=str(RESULTS / "elastic_speed.json"))
    args = parser.parse_args()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]

    # No prefix caching: the prefill prompts share their first tokens with the decode prompts (one
    # text), and level 100's hits would have inflated its prefill rate (its salt is the plain one).
    llm = LLM(elastic="on", elastic_checkpoint=args.elastic_checkpoint, max_num_seqs=max(batch_sizes),
              max_num_batched_tokens=max(512, args.prefill_len), enable_prefix_caching=False)
    spec_levels = llm.engine.elastic_levels
    spec = llm.engine.runner.elastic_spec
    prompts = prompt_tokens(llm, max(batch_sizes), args.context)
    prefill_prompts = prompt_tokens(llm, args.prefill_prompts, args.prefill_len)
    prefill_tok_s(llm, prefill_prompts[:1], spec_levels[0])  # warm-up
    mixed_levels = {batch: [spec_levels[i % len(spec_levels)] for i in range(batch)] for batch in batch_sizes}
    samples: dict[tuple, list[float]] = {}  # (level or "mixed", batch or "prefill") -> one figure a round
    for _ in tqdm(range(args.rounds), desc="rounds"):
        for level in spec_levels:
            for batch in batch_sizes:
                seconds = decode_step_seconds(llm, prompts[:batch], [level] * batch, args.decode_steps)
                samples.setdefault((level, batch), []).append(seconds)
            samples.setdefault((level, "prefill"), []).append(prefill_tok_s(llm, prefill_prompts, level))
        for batch in batch_sizes:
            seconds = decode_step_seconds(llm, prompts[:batch], mixed_levels[batch], args.decode_steps)
            samples.setdefault(("mixed", batch), []).append(seconds)
    median = {key: statistics.median(values) for key, values in samples.items()}
    rows = [LevelSpeed(level, spec.flop_fraction(level, args.context),
                       {batch: batch / median[level, batch] for batch in batch_sizes}, median[level, "prefill"])
            for level in spec_levels]
    mixed = {}
    for batch in batch_sizes:
        levels = mixed_levels[batch]
        predicted = sum(median[level, batch] for level in levels) / batch
        by_flops = median[spec_levels[0], batch] * sum(spec.flop_fraction(lv, args.context) for lv in levels) / batch
        mixed[batch] = {"measured_ms": 1000 * median["mixed", batch], "predicted_ms": 1000 * predicted,
                        "flop_scaled_full_ms": 1000 * by_flops}
    report(rows, mixed, batch_sizes, llm, args)


def report(rows: list[LevelSpeed], mixed: dict, batch_sizes: list[int], llm: LLM, args) -> None:
    full = rows[0]
    lines = [*machine_lines(machine()), setup_line("engine", engine_setup(llm)), "",
             "| level | FLOP fraction | " + " | ".join(f"decode tok/s @{b} (x full)" for b in batch_sizes)
             + " | prefill tok/s (x full) |",
             "|---|---|" + "---|" * len(batch_sizes) + "---|"]
    for row in rows:
        decode = " | ".join(f"{row.decode_tok_s[b]:.1f} ({row.decode_tok_s[b] / full.decode_tok_s[b]:.2f}x)"
                            for b in batch_sizes)
        lines.append(f"| {row.level} | {row.flop_fraction:.3f} | {decode} | {row.prefill_tok_s:.0f} "
                     f"({row.prefill_tok_s / full.prefill_tok_s:.2f}x) |")
    lines += ["", "| mixed step (rows spread over every level) | measured ms | predicted ms | ratio | "
                  "full x mean FLOP fraction ms |", "|---|---|---|---|---|"]
    for batch, m in mixed.items():
        lines.append(f"| {batch} rows | {m['measured_ms']:.1f} | {m['predicted_ms']:.1f} | "
                     f"{m['measured_ms'] / m['predicted_ms']:.3f} | {m['flop_scaled_full_ms']:.1f} |")
    lines += ["", f"Medians of {args.rounds} interleaved rounds, {args.decode_steps} decode steps a measurement, "
                  f"{args.context}-token contexts, prefill of {args.prefill_prompts} x {args.prefill_len} tokens."]
    text = "\n".join(lines)
    print(text)
    path = Path(args.save_result)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"levels": [asdict(r) for r in rows], "mixed": mixed}, indent=1))
    path.with_suffix(".md").write_text(text + "\n")


if __name__ == "__main__":
    main()
