"""Decode speed at a fixed batch: N running sequences at about C tokens of context.

Fills the batch with C-token prompts (real ShareGPT text), lets every prefill finish, then times
the decode steps alone and prints output tokens/s and ms per step, with the CPU (and the
ELASTIC_ENGINE_CPU_ISA mask, if set) and the dtype and weight format the engine resolved.

    .venv/bin/python benchmarks/decode_speed.py --num-seqs 64 --context 512
    .venv/bin/python benchmarks/decode_speed.py --num-seqs 64 --context 512 --weight-format dequantized
    .venv/bin/python benchmarks/decode_speed.py --num-seqs 64 --context 448 --elastic off   # the plain model
"""

from __future__ import annotations

import argparse
import time

from tqdm import tqdm

from engine import LLM, SamplingParams
from engine.bench.datasets import first_exchange, load_sharegpt
from engine.config import DTYPES, ELASTIC_MODES, WEIGHT_FORMATS
from peers.machine import engine_setup, machine, machine_lines, setup_line


def text_tokens(tokenizer, num_tokens: int) -> list[int]:
    ids: list[int] = []
    for record in load_sharegpt():
        exchange = first_exchange(record)
        if exchange:
            ids += tokenizer.encode(exchange[1])
        if len(ids) >= num_tokens:
            return ids
    raise RuntimeError("not enough ShareGPT text")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-seqs", type=int, default=64)
    parser.add_argument("--context", type=int, default=512, help="prompt tokens per sequence")
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--dtype", default="auto", choices=DTYPES, help="auto: the engine's pick for this CPU")
    parser.add_argument("--weight-format", default="auto", choices=WEIGHT_FORMATS,
                        help="auto: the engine's pick for this CPU")
    parser.add_argument("--model", default=None)
    parser.add_argument("--elastic", default="auto", choices=ELASTIC_MODES,
                        help="auto: the elastic checkpoint where one is cached; off: the plain model")
    args = parser.parse_args()

    llm = LLM(args.model, dtype=args.dtype, weight_format=args.weight_format, max_num_seqs=args.num_seqs,
              elastic=args.elastic)
    setup = engine_setup(llm)
    engine = llm.engine
    text = text_tokens(engine.tokenizer, args.num_seqs * 7 + args.context)
    # Early prompts decode while later ones prefill: leave room so none finishes before the end.
    params = SamplingParams(temperature=0.0, max_tokens=args.num_seqs * args.context // 256 + args.decode_steps + 8,
                            ignore_eos=True)
    for i in range(args.num_seqs):
        engine.add_request(f"seq{i}", text[7 * i: 7 * i + args.context], params)  # distinct prompts
    with tqdm(desc="prefill", unit="step") as bar:
        while engine.scheduler.waiting or any(r.num_output_tokens == 0 for r in engine.scheduler.running):
            engine.step()
            bar.update(1)
    engine.step()  # one warm-up decode step at the final shapes
    start = time.perf_counter()
    generated = 0
    for _ in tqdm(range(args.decode_steps), desc="decode", unit="step"):
        engine.step()
        generated += engine.stats.num_generation_tokens_step
    elapsed = time.perf_counter() - start
    assert engine.scheduler.num_running == args.num_seqs, "a sequence finished or was preempted mid-measure"
    context = sum(r.num_tokens for r in engine.scheduler.running) / args.num_seqs
    engine.abort_request([f"seq{i}" for i in range(args.num_seqs)])
    for line in [*machine_lines(machine()), setup_line("engine", setup)]:
        print(line)
    print(f"{args.num_seqs} sequences at {context:.0f} tokens of mean context, {setup['dtype']}, "
          f"{setup['weight_format']} weights: {generated / elapsed:.1f} output tokens/s, "
          f"{1000 * elapsed / args.decode_steps:.1f} ms per decode step")


if __name__ == "__main__":
    main()
