"""A document's prefill at one level beside decodes at another: what a step that mixes levels costs.

    .venv/bin/python benchmarks/mixed_level_prefill.py          # about 4 minutes

Issue #15's auto settings at high load keep chats at their floor (level 70) while documents fall
to level 40, so most prefill steps mix levels: a chunk of a document beside a few chat decodes.
On prepacked level slices (AMX CPUs, steps past 32 rows) a step of GROUPED_LEVELS_MIN_ROWS rows
or more runs each level's rows through its own slices (engine/model/llama.py, runs_level_groups);
below it, or where a block does not group, every row runs at the widest level present.  This
prefills a document of 1,536 tokens in chunks of 256 beside 4 decodes, for each pairing of
levels, and for 40 beside 70 also with the attention block at the widest level (as before the
attention grouped), each way once a round, `--rounds` rounds (the first a warm-up).  Prints
and writes benchmarks/results/mixed_level_prefill.md: seconds to the document's first token.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from engine import LLM, SamplingParams
from engine.model import llama

RESULTS = Path(__file__).parent / "results"
CHUNK_TOKENS = 256
NUM_DECODES = 4
DOCUMENT_TOKENS = 1536
# (name, decodes' level, document's level, attention grouped)
WAYS = (("all at 100", 100, 100, True), ("all at 70", 70, 70, True), ("all at 40", 40, 40, True),
        ("decodes at 70, document at 40", 70, 40, True),
        ("decodes at 70, document at 40, attention at the widest", 70, 40, False),
        ("decodes at 100, document at 40", 100, 40, True))


@contextmanager
def attention_grouped(grouped: bool):
    """grouped False: the attention block runs every row at the widest level (its earlier path)."""
    original = llama.SelfAttention._forward_level_groups
    if not grouped:
        llama.SelfAttention._forward_level_groups = lambda self, x, kv_cache, batch, rows: self._forward_level_slice(
            x, kv_cache, batch, rows)
    try:
        yield
    finally:
        llama.SelfAttention._forward_level_groups = original


def document_prefill_s(llm: LLM, prompts: list[list[int]], name: str, decode_level: int, document_level: int,
                       number: int) -> float:
    """Seconds from the document's arrival to its first token, beside NUM_DECODES running decodes."""
    engine = llm.engine
    decode_params = SamplingParams(temperature=0.0, max_tokens=4000, ignore_eos=True)
    decode_ids = [f"{name}-{number}-decode-{i}" for i in range(NUM_DECODES)]
    for i, request_id in enumerate(decode_ids):
        engine.add_request(request_id, prompts[1 + i][:40], decode_params, elastic_level=decode_level)
    for _ in range(3):  # the decodes' prompts
        engine.step()
    engine.add_request(f"{name}-{number}-document", prompts[0], SamplingParams(temperature=0.0, max_tokens=1),
                       elastic_level=document_level)
    document = engine.scheduler.waiting[-1]
    start = time.perf_counter()
    while document.metrics.first_token_time is None:
        engine.step()
    seconds = time.perf_counter() - start
    engine.abort_request(decode_ids)
    engine.step()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4, help="each way once a round; the first is a warm-up")
    args = parser.parse_args()
    from tqdm import tqdm

    from peers.machine import machine, machine_lines

    sys.path.insert(0, str(Path(__file__).parent))
    from elastic_speed import prompt_tokens  # a benchmark sibling: real ShareGPT text

    llm = LLM(elastic="on", max_num_seqs=16, max_num_batched_tokens=CHUNK_TOKENS + NUM_DECODES,
              enable_prefix_caching=False)
    prompts = prompt_tokens(llm, 1 + NUM_DECODES, DOCUMENT_TOKENS)
    seconds: dict[str, list[float]] = {}
    for number in tqdm(range(args.rounds), desc="rounds"):
        for name, decode_level, document_level, grouped in WAYS:
            with attention_grouped(grouped):
                took = document_prefill_s(llm, prompts, name, decode_level, document_level, number)
            if number:
                seconds.setdefault(name, []).append(took)
    uniform_40 = statistics.median(seconds["all at 40"])
    lines = ["# A document's prefill beside decodes at another level", "", *machine_lines(machine()), "",
             f"A document of {DOCUMENT_TOKENS} tokens in chunks of {CHUNK_TOKENS} beside {NUM_DECODES} decodes "
             f"({llm.engine.runner.plan.weights_label}); seconds to its first token, median of {args.rounds - 1} "
             "rounds (every round in brackets):", "",
             "| way | seconds | over all at 40 |", "|---|---|---|"]
    for name, *_ in WAYS:
        values = seconds[name]
        lines.append(f"| {name} | {statistics.median(values):.3f} ({', '.join(f'{v:.3f}' for v in values)}) | "
                     f"{statistics.median(values) / uniform_40:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "mixed_level_prefill.md").write_text(text)


if __name__ == "__main__":
    main()
