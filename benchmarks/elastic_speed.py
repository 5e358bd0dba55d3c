"""Elastic levels' speed on this CPU: decode tokens/s at 16 and 32 running requests per level,
prefill tokens/s per level, each level's FLOP fraction, and a step mixing every level against
what the uniform steps predict.

One engine serves every level (switching is free: each level is a prefix view of the same
weights), so all figures come from one process and one load.

    .venv/bin/python benchmarks/elastic_speed.py
    .venv/bin/python benchmarks/elastic_speed.py --batch-sizes 16 --bursts 1   # quick
    .venv/bin/python benchmarks/elastic_speed.py --kv-cache-dtype int8          # K/V stored as int8

Bursts: this VM's speed drifts by tens of percent within minutes, so decode steps are timed in
short bursts that take turns.  A round prefills one batch of requests once, then cycles through
every level and the mixed step `--bursts` times, `--burst-steps` timed steps each (one untimed
step after each switch: a running request's level changes between steps at no cost, as the SLO
policy changes it); a figure is the median over every burst of its kind.  A slow minute then
lands on every level alike.  The prompts are shorter than `--context` by half the steps a round
decodes, so the contexts average `--context` over the round.

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
from engine.config import KV_CACHE_DTYPES
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


def steps_a_round(num_mixes: int, num_bursts: int, burst_steps: int) -> int:
    """Decode steps decode_bursts runs: every burst's timed steps and its switch's step."""
    return num_mixes * num_bursts * (burst_steps + 1)


def running_batch(llm: LLM, prompts: list[list[int]], max_tokens: int, tag: str) -> list:
    """Adds one greedy request per prompt and steps until each has its first token: their Requests,
    in prompt order."""
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    ids = [f"{tag}-{i}" for i in range(len(prompts))]
    for request_id, prompt in zip(ids, prompts):
        engine.add_request(request_id, prompt, params)
    while engine.scheduler.waiting or any(r.num_output_tokens == 0 for r in engine.scheduler.running):
        engine.step()
    running = {r.request_id: r for r in engine.scheduler.running}
    return [running[request_id] for request_id in ids]


def burst_seconds(llm: LLM, requests: list, levels: list[int], steps: int) -> float:
    """Seconds a decode step over `steps` steps, each request at its level of `levels`, after one
    untimed step for the switch."""
    for request, level in zip(requests, levels):
        request.elastic_level = level
    llm.engine.step()
    start = time.perf_counter()
    for _ in range(steps):
        llm.engine.step()
    return (time.perf_counter() - start) / steps


def end_batch(llm: LLM, requests: list) -> None:
    engine = llm.engine
    assert engine.scheduler.num_running == len(requests), "a request finished or was preempted mid-measure"
    engine.abort_request([r.request_id for r in requests])
    engine.step()


def decode_bursts(llm: LLM, prompts: list[list[int]], mixes: dict, num_bursts: int, burst_steps: int) -> dict:
    """Seconds a decode step, one figure a burst, for each of `mixes` (name -> each row's level),
    with one running request per prompt whose levels change between bursts."""
    total_steps = steps_a_round(len(mixes), num_bursts, burst_steps)
    requests = running_batch(llm, prompts, total_steps + 64, "bursts")  # mixes' levels are in prompt order
    seconds: dict[str, list[float]] = {name: [] for name in mixes}
    for _ in range(num_bursts):
        for name, levels in mixes.items():
            seconds[name].append(burst_seconds(llm, requests, levels, burst_steps))
    end_batch(llm, requests)
    return seconds


def prefill_tok_s(llm: LLM, prompts: list[list[int]], level: int) -> float:
    params = SamplingParams(temperature=0.0, max_tokens=1)
    start = time.perf_counter()
    llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False, elastic_level=level)
    return sum(len(p) for p in prompts) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", default="16,32")
    parser.add_argument("--context", type=int, default=256, help="prompt tokens of each decoding request")
    parser.add_argument("--bursts", type=int, default=4, help="turns each level and mix takes a round")
    parser.add_argument("--burst-steps", type=int, default=4, help="timed decode steps a burst")
    parser.add_argument("--prefill-prompts", type=int, default=4)
    parser.add_argument("--prefill-len", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3, help="prefilled batches a batch size; figures are medians")
    parser.add_argument("--elastic-checkpoint", default=None)
    parser.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES)
    parser.add_argument("--save-result", default=str(RESULTS / "elastic_speed.json"))
    args = parser.parse_args()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]

    # No prefix caching: the prefill prompts share their first tokens with the decode prompts (one
    # text), and level 100's hits would have inflated its prefill rate (its salt is the plain one).
    llm = LLM(elastic="on", elastic_checkpoint=args.elastic_checkpoint, max_num_seqs=max(batch_sizes),
              max_num_batched_tokens=max(512, args.prefill_len), enable_prefix_caching=False,
              kv_cache_dtype=args.kv_cache_dtype)
    spec_levels = llm.engine.elastic_levels
    spec = llm.engine.runner.elastic_spec
    mixed_levels = {batch: [spec_levels[i % len(spec_levels)] for i in range(batch)] for batch in batch_sizes}
    round_steps = steps_a_round(len(spec_levels) + 1, args.bursts, args.burst_steps)  # each level, then mixed
    prompts = prompt_tokens(llm, max(batch_sizes), max(1, args.context - round_steps // 2))
    prefill_prompts = prompt_tokens(llm, args.prefill_prompts, args.prefill_len)
    prefill_tok_s(llm, prefill_prompts[:1], spec_levels[0])  # warm-up
    samples: dict[tuple, list[float]] = {}  # (level or "mixed", batch or "prefill") -> one figure a burst or pass
    for _ in tqdm(range(args.rounds), desc="rounds"):
        for batch in batch_sizes:
            mixes = {level: [level] * batch for level in spec_levels} | {"mixed": mixed_levels[batch]}
            for name, seconds in decode_bursts(llm, prompts[:batch], mixes, args.bursts, args.burst_steps).items():
                samples.setdefault((name, batch), []).extend(seconds)
        for level in spec_levels:
            samples.setdefault((level, "prefill"), []).append(prefill_tok_s(llm, prefill_prompts, level))
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
    lines += ["", f"Decode: medians of {args.rounds} rounds x {args.bursts} bursts of {args.burst_steps} steps, levels "
                  f"taking turns, contexts averaging {args.context} tokens; prefill: medians of {args.rounds} passes "
                  f"of {args.prefill_prompts} x {args.prefill_len} tokens."]
    save_report(Path(args.save_result), lines, {"levels": [asdict(r) for r in rows], "mixed": mixed})


def save_report(path: Path, lines: list[str], figures: dict) -> None:
    """Prints the report, writes the figures to `path` (JSON) and the report beside it (.md)."""
    text = "\n".join(lines)
    print(text)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(figures, indent=1))
    path.with_suffix(".md").write_text(text + "\n")


if __name__ == "__main__":
    main()
