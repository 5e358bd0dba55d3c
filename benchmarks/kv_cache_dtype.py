"""The int8 KV cache against the model-dtype one, in one run: quality, memory and decode speed.

Two engines load side by side, `--kv-cache-dtype auto` and `int8` (engine/kernels/kv_cache_format.py),
both elastic, and are measured at the full level and at the lowest level:

1. Quality on held-out ShareGPT conversations (engine/bench/conversations.py), through prompt
   logprobs as served: perplexity of the assistant's answers, and how often int8's top token at
   an answer position is auto's (teacher-forced top-1 agreement).
2. Memory: KV blocks that fit --kv-cache-memory, and bytes a token.
3. Decode tokens/s at --batch-sizes running requests, contexts averaging --context tokens.  Both
   engines hold one prefilled batch, then take turns in bursts (`--bursts` x `--burst-steps`
   timed steps, one untimed step after each switch), the levels taking turns too, so a slow
   minute of this VM lands on both alike.

    .venv/bin/python benchmarks/kv_cache_dtype.py
    .venv/bin/python benchmarks/kv_cache_dtype.py --batch-sizes 16 --rounds 1 --num-conversations 4   # quick

Writes --save-result (JSON) and a markdown table beside it (.md).
"""

from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path

from tqdm import tqdm

from elastic import answer_scores
from elastic_speed import burst_seconds, end_batch, prompt_tokens, running_batch, save_report
from engine import LLM
from engine.bench.conversations import held_out_conversations
from peers.machine import engine_setup, machine, machine_lines, setup_line

RESULTS = Path(__file__).parent / "results"
DTYPES = ("auto", "int8")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", default="16,32")
    parser.add_argument("--context", type=int, default=256, help="prompt tokens of each decoding request")
    parser.add_argument("--rounds", type=int, default=3, help="prefilled batches a batch size")
    parser.add_argument("--bursts", type=int, default=4, help="turns each engine and level takes a round")
    parser.add_argument("--burst-steps", type=int, default=4, help="timed decode steps a burst")
    parser.add_argument("--num-conversations", type=int, default=16, help="held-out answers scored")
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--kv-cache-memory", type=float, default=1.0, help="GiB a engine")
    parser.add_argument("--save-result", default=str(RESULTS / "kv_cache_dtype.json"))
    args = parser.parse_args()
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    return args


def quality(llms: dict[str, LLM], levels: list[int], args: argparse.Namespace) -> dict:
    """Per level and dtype: answer perplexity, and int8's top-1 agreement with auto."""
    conversations = held_out_conversations(llms["auto"].get_tokenizer(), args.num_conversations, seed=0,
                                           max_seq_len=args.max_seq_len)
    figures = {}
    for level in tqdm(levels, desc="quality"):
        scores = {name: answer_scores(llm, conversations, level) for name, llm in llms.items()}
        agree = sum(a == b for mine, theirs in zip(scores["int8"][2], scores["auto"][2]) for a, b in zip(mine, theirs))
        figures[level] = {name: {"perplexity": math.exp(nll / count)} for name, (nll, count, _) in scores.items()}
        figures[level]["int8"]["top1_agreement"] = agree / scores["auto"][1]
        figures[level]["scored_tokens"] = scores["auto"][1]
    return figures


def decode_speed(llms: dict[str, LLM], levels: list[int], args: argparse.Namespace) -> dict:
    """(dtype, level, batch) -> decode tokens/s, medians over every burst."""
    samples: dict[tuple, list[float]] = {}
    round_steps = args.bursts * len(levels) * (args.burst_steps + 1)
    for round_index in tqdm(range(args.rounds), desc="decode rounds"):
        for batch in args.batch_sizes:
            prompts = prompt_tokens(llms["auto"], batch, max(1, args.context - round_steps // 2))
            batches = {name: running_batch(llm, prompts, round_steps + 64, f"r{round_index}-{batch}")
                       for name, llm in llms.items()}
            for _ in range(args.bursts):
                for level in levels:
                    for name, llm in llms.items():
                        seconds = burst_seconds(llm, batches[name], [level] * batch, args.burst_steps)
                        samples.setdefault((name, level, batch), []).append(batch / seconds)
            for name, llm in llms.items():
                end_batch(llm, batches[name])
    return {key: statistics.median(values) for key, values in samples.items()}


def report(llms: dict[str, LLM], levels: list[int], figures: dict, speed: dict, args: argparse.Namespace) -> None:
    runners = {name: llm.engine.runner for name, llm in llms.items()}
    lines = [*machine_lines(machine()), *(setup_line(f"KV cache {name}", engine_setup(llm)) for name, llm in llms.items()), "",
             "| KV cache | blocks in " + f"{args.kv_cache_memory:g} GiB | cache bytes a token (K, V, pruning's hidden row) |", "|---|---|---|"]
    for name, runner in runners.items():
        per_token = runner.kv_cache_bytes / (runner.num_kv_blocks * runner.block_size)
        lines.append(f"| {name} | {runner.num_kv_blocks} | {per_token:.0f} |")
    lines += ["", "| level | perplexity auto | perplexity int8 (ratio) | int8 top-1 agreement with auto | "
              + " | ".join(f"decode tok/s @{b} auto / int8 (ratio)" for b in args.batch_sizes) + " |",
              "|---|---|---|---|" + "---|" * len(args.batch_sizes)]
    for level in levels:
        q = figures[level]
        auto_ppl, int8_ppl = q["auto"]["perplexity"], q["int8"]["perplexity"]
        cells = [f"{speed['auto', level, b]:.0f} / {speed['int8', level, b]:.0f} "
                 f"({speed['int8', level, b] / speed['auto', level, b]:.2f}x)" for b in args.batch_sizes]
        lines.append(f"| {level} | {auto_ppl:.3f} | {int8_ppl:.3f} ({int8_ppl / auto_ppl:.4f}) | "
                     f"{100 * q['int8']['top1_agreement']:.1f}% | " + " | ".join(cells) + " |")
    lowest = levels[-1]
    lines += ["", "| KV cache | " + " | ".join(f"level {lowest} / full decode @{b}" for b in args.batch_sizes) + " |",
              "|---|" + "---|" * len(args.batch_sizes)]
    for name in llms:
        lines.append(f"| {name} | " + " | ".join(f"{speed[name, lowest, b] / speed[name, levels[0], b]:.2f}x"
                                                 for b in args.batch_sizes) + " |")
    lines += ["", f"Quality: {figures[levels[0]]['scored_tokens']} answer tokens of {args.num_conversations} held-out "
                  f"conversations, through prompt logprobs.  Decode: medians of {args.rounds} rounds x {args.bursts} "
                  f"bursts of {args.burst_steps} steps, engines and levels taking turns, contexts averaging "
                  f"{args.context} tokens."]
    save_report(Path(args.save_result), lines, {"quality": {str(k): v for k, v in figures.items()},
                                                "decode_tok_s": {f"{n}/{lv}/{b}": v for (n, lv, b), v in speed.items()}})


def main() -> None:
    args = parse_args()
    # No prefix caching: the decode prompts share their first tokens (one text), and a hit would
    # skip the prefill whose KV the quality figures are meant to read back.
    llms = {name: LLM(elastic="on", kv_cache_dtype=name, kv_cache_memory=args.kv_cache_memory,
                      max_num_seqs=max(args.batch_sizes), enable_prefix_caching=False) for name in DTYPES}
    spec_levels = llms["auto"].engine.elastic_levels
    levels = [spec_levels[0], spec_levels[-1]]
    figures = quality(llms, levels, args)
    speed = decode_speed(llms, levels, args)
    report(llms, levels, figures, speed, args)


if __name__ == "__main__":
    main()
