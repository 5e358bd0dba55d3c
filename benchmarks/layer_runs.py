"""Decode steps: one C++ call a layer against a run of layers in one call.

    .venv/bin/python benchmarks/layer_runs.py            # about 3 minutes

A decode step hands the C++ call (engine/kernels/cpu/decode_layer.cpp, `decode_layers`) every
run of consecutive layers that take the one-call path, runs ending at prune layers; before, it
made one call a layer, each with ~40 us of Python around it.  This times whole `engine.step()`s of
running greedy requests (real ShareGPT prompts, contexts ~256 tokens) at each row count and
level, the two ways taking turns every step (this VM's speed drifts within minutes), and prints
the median of each.  "One call a layer" cuts every run after its first layer (the model's forward
then asks again at the next layer, as it did layer by layer).  Writes
benchmarks/results/layer_runs.md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from tqdm import tqdm

from elastic_speed import end_batch, prompt_tokens, running_batch
from engine import LLM
from engine.model import llama
from peers.machine import engine_setup, machine, machine_lines, setup_line

RESULTS = Path(__file__).parent / "results"


def one_call_a_layer(runs):
    """`fused_run` cut to its run's first layer."""
    def first_layer_only(layers, start, stop, *rest):
        return runs(layers, start, min(stop, start + 1), *rest)
    return first_layer_only


def time_steps(llm: LLM, requests: list, level: int, num_steps: int) -> dict[str, list[float]]:
    """Seconds of `num_steps` steps each way at `level`, the ways taking turns (first one, then
    the other, swapped every step)."""
    runs = llama.fused_run
    ways = {"runs": runs, "per layer": one_call_a_layer(runs)}
    for request in requests:
        request.elastic_level = level
    llm.engine.step()  # the switch
    seconds: dict[str, list[float]] = {name: [] for name in ways}
    try:
        for index in range(num_steps):
            for name in (("runs", "per layer") if index % 2 else ("per layer", "runs")):
                llama.fused_run = ways[name]
                start = time.perf_counter()
                llm.engine.step()
                seconds[name].append(time.perf_counter() - start)
    finally:
        llama.fused_run = runs
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1,8,16,32", help="running requests a step")
    parser.add_argument("--levels", default="100,40")
    parser.add_argument("--steps", type=int, default=100, help="timed steps each way, per row count and level")
    args = parser.parse_args()
    llm = LLM(elastic="on", max_num_seqs=32, max_num_batched_tokens=512, enable_prefix_caching=False)
    levels = [int(v) for v in args.levels.split(",")]
    lines = ["# Decode steps: one C++ call a layer against a run of layers in one call", "",
             *machine_lines(machine()), setup_line("engine", engine_setup(llm)), "",
             "| rows | level | one call a layer ms | a run in one call ms | saved ms | ratio |",
             "|---|---|---|---|---|---|"]
    for num_rows in tqdm([int(v) for v in args.rows.split(",")], desc="row counts"):
        # Room for the tokens the first requests decode while the others prefill, as elastic_speed.py leaves.
        requests = running_batch(llm, prompt_tokens(llm, num_rows, 256), len(levels) * (2 * args.steps + 1) + 64,
                                 f"runs-{num_rows}")
        for level in levels:
            seconds = time_steps(llm, requests, level, args.steps)
            per_layer, runs = (1000 * statistics.median(seconds[name]) for name in ("per layer", "runs"))
            lines.append(f"| {num_rows} | {level} | {per_layer:.2f} | {runs:.2f} | {per_layer - runs:.2f} | "
                         f"{per_layer / runs:.3f}x |")
        end_batch(llm, requests)
    lines += ["", f"Medians of {args.steps} steps each way, the ways taking turns every step."]
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "layer_runs.md").write_text(text)


if __name__ == "__main__":
    main()
