"""Prepacked linears at bucketed row counts against exact ones: prefill in chunks of varying size.

    .venv/bin/python benchmarks/prepacked_rows.py          # about 3 minutes

oneDNN compiles a kernel for every new (rows, weight shape) a prepacked bf16 weight meets
(engine/model/layers/linear.py, packed_rows_bucket).  A workload whose step sizes vary, as chunked
prefill's do under a TPOT bound, keeps meeting new ones.  This prefills 8 documents of 1,536 tokens
(levels 40, 70 and 100 in turn) beside 4 decodes, each step's token budget drawn at random from
37-304 (seeded), three passes in one process (the first pays the compiles; the third runs warm,
each pass drawing other sizes).  Each way runs in a fresh process, the two ways alternating
`--rounds` times; the exact way sets PACKED_EXACT_ROWS past every row count.  Needs a CPU where
oneDNN prepacks bf16 (AVX-512 BF16 or AMX); elsewhere no step runs a prepacked weight and it says so.
Writes benchmarks/results/prepacked_rows.md.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
PASSES = 3
NUM_DOCUMENTS = 8
NUM_DECODES = 4
DOCUMENT_TOKENS = 1536
BUDGETS = (37, 304)  # each step's token budget, drawn uniformly (4 of it the decodes')


def child(way: str) -> None:
    """One process: the passes' wall times as JSON on stdout's last line."""
    import engine.model.layers.linear as linear
    from engine import LLM, SamplingParams
    from engine.model.compute_plan import _can_prepack_bf16

    if not _can_prepack_bf16():
        print(json.dumps({"skipped": "oneDNN cannot prepack bf16 on this CPU: no step runs a prepacked weight"}))
        return
    if way == "exact":
        linear.PACKED_EXACT_ROWS = 1 << 30
    sys.path.insert(0, str(Path(__file__).parent))
    from elastic_speed import prompt_tokens  # a benchmark sibling: real ShareGPT text

    llm = LLM(elastic="on", max_num_seqs=16, max_num_batched_tokens=512, enable_prefix_caching=False)
    engine = llm.engine
    prompts = prompt_tokens(llm, NUM_DOCUMENTS + NUM_DECODES, DOCUMENT_TOKENS)
    decode_params = SamplingParams(temperature=0.0, max_tokens=6000, ignore_eos=True)
    for i in range(NUM_DECODES):
        engine.add_request(f"decode-{i}", prompts[NUM_DOCUMENTS + i][:40], decode_params, elastic_level=70)
    for _ in range(3):
        engine.step()
    passes = []
    for number in range(PASSES):
        rng = random.Random(number)
        start, steps = time.perf_counter(), 0
        for doc in range(NUM_DOCUMENTS):
            engine.add_request(f"doc-{number}-{doc}", prompts[doc], SamplingParams(temperature=0.0, max_tokens=1),
                               elastic_level=(40, 70, 100)[doc % 3])
            request = engine.scheduler.waiting[-1]
            while request.metrics.first_token_time is None:
                engine.scheduler.max_num_batched_tokens = rng.randint(*BUDGETS)
                engine.step()
                steps += 1
        passes.append({"seconds": time.perf_counter() - start, "steps": steps})
    print(json.dumps({"passes": passes}))


def run_child(way: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", way], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the two ways, a fresh process each")
    parser.add_argument("--child", choices=("exact", "bucketed"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    from tqdm import tqdm

    from peers.machine import machine, machine_lines

    seconds: dict[tuple[str, int], list[float]] = {}
    for _ in tqdm(range(args.rounds), desc="rounds"):
        for way in ("exact", "bucketed"):
            result = run_child(way)
            if "skipped" in result:
                print(result["skipped"])
                return
            for number, one in enumerate(result["passes"]):
                seconds.setdefault((way, number), []).append(one["seconds"])
    lines = ["# Prefill in chunks of varying size: prepacked linears at exact and bucketed row counts", "",
             *machine_lines(machine()), "",
             f"{NUM_DOCUMENTS} documents of {DOCUMENT_TOKENS} tokens beside {NUM_DECODES} decodes, step budgets "
             f"{BUDGETS[0]}-{BUDGETS[1]} tokens; seconds a pass, each run in its own process ({args.rounds} each, "
             "alternating; median, and every run):", "",
             "| pass | exact rows | bucketed rows | exact / bucketed |", "|---|---|---|---|"]
    for number in range(PASSES):
        exact, bucketed = seconds["exact", number], seconds["bucketed", number]
        label = "1 (compiles)" if number == 0 else str(number + 1)
        lines.append(f"| {label} | {statistics.median(exact):.2f} ({', '.join(f'{s:.2f}' for s in exact)}) | "
                     f"{statistics.median(bucketed):.2f} ({', '.join(f'{s:.2f}' for s in bucketed)}) | "
                     f"**{statistics.median(exact) / statistics.median(bucketed):.2f}x** |")
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "prepacked_rows.md").write_text(text)


if __name__ == "__main__":
    main()
