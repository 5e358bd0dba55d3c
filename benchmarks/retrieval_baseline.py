"""Accuracy of the full (unpruned) model on the long-context retrieval tasks: the baseline beside
which prompt pruning is judged (engine/bench/retrieval_tasks.py builds the prompts).

Every task x filler x length cell gets its own seeded set of --num-samples prompts (lengths of
4096 tokens and more get --num-samples-long: they cost four times a 1k prompt and more), answered
greedily through the offline API with as many tokens as the cell's answers need, and scored by
the fraction of expected answers found in the text.

    .venv/bin/python benchmarks/retrieval_baseline.py
    .venv/bin/python benchmarks/retrieval_baseline.py --tasks passkey --lengths 1024 --num-samples 10   # quick
    .venv/bin/python benchmarks/retrieval_baseline.py --prompt-format chat --save-result /tmp/chat.json

Writes --save-result (JSON, every generated answer included) and the markdown table beside it (.md).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from engine.bench.retrieval_tasks import (
    FILLERS,
    LENGTHS,
    NUM_MULTI_NEEDLES,
    PROMPT_FORMATS,
    TASKS,
    Filler,
    RetrievalSample,
    Task,
    make_task_set,
)
from peers.machine import engine_setup, machine, machine_lines, setup_line

REPO_ROOT = Path(__file__).resolve().parent.parent
LONG_LENGTH = 4096  # from this length on, a cell gets --num-samples-long samples


@dataclass(frozen=True, slots=True)
class Cell:
    """One task x filler x length: its samples' scores and what the model wrote."""

    task: Task
    filler: Filler
    length: int
    scores: list[float]
    prompt_lens: list[int]
    answers: list[list[str]]
    generated: list[str]

    @property
    def accuracy(self) -> float:
        return sum(self.scores) / len(self.scores)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, of {', '.join(TASKS)}")
    parser.add_argument("--fillers", default=",".join(FILLERS), help=f"comma-separated, of {', '.join(FILLERS)}")
    parser.add_argument("--lengths", default=",".join(map(str, LENGTHS)), help="comma-separated prompt lengths")
    parser.add_argument("--num-samples", type=int, default=30, help=f"samples per cell below {LONG_LENGTH} tokens")
    parser.add_argument("--num-samples-long", type=int, default=10, help=f"samples per cell of {LONG_LENGTH}+ tokens")
    parser.add_argument("--prompt-format", default="raw", choices=PROMPT_FORMATS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default=None, help="GGUF file or HF directory; default: the bundled SmolLM2")
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048, help="the engine's token budget per step")
    parser.add_argument("--save-result", type=Path, default=REPO_ROOT / "benchmarks/results/retrieval_baseline.json",
                        help="JSON; the .md table goes beside it")
    args = parser.parse_args()
    args.tasks = _choices(parser, "--tasks", args.tasks, TASKS)
    args.fillers = _choices(parser, "--fillers", args.fillers, FILLERS)
    args.lengths = [int(length) for length in args.lengths.split(",") if length.strip()]
    if min(args.num_samples, args.num_samples_long, *args.lengths) < 1:
        parser.error("sample counts and lengths must be positive")
    return args


def _choices(parser: argparse.ArgumentParser, flag: str, value: str, allowed: tuple[str, ...]) -> list[Any]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in allowed]
    if unknown:
        parser.error(f"{flag}: unknown {unknown}; choose from {', '.join(allowed)}")
    return names


def num_samples_at(args: argparse.Namespace, length: int) -> int:
    return args.num_samples_long if length >= LONG_LENGTH else args.num_samples


def run_cell(llm: Any, samples: list[RetrievalSample], length: int) -> Cell:
    """All of a cell's prompts in one `generate` call (the engine batches them), greedy."""
    from engine import SamplingParams

    params = [SamplingParams(temperature=0.0, max_tokens=sample.max_tokens) for sample in samples]
    outputs = llm.generate([sample.prompt for sample in samples], params, use_tqdm=False)
    texts = [output.outputs[0].text for output in outputs]
    first = samples[0]
    return Cell(first.task, first.filler, length, [sample.score(text) for sample, text in zip(samples, texts)],
                [sample.prompt_len for sample in samples], [list(sample.answers) for sample in samples], texts)


def run(args: argparse.Namespace, llm: Any) -> Iterator[Cell]:
    """Every cell in turn, under one progress bar counting prompts."""
    tokenizer = llm.get_tokenizer()
    grid = [(task, filler, length) for task in args.tasks for filler in args.fillers for length in args.lengths]
    with tqdm(total=sum(num_samples_at(args, length) for _, _, length in grid), unit="prompt") as bar:
        for task, filler, length in grid:
            bar.set_description(f"{task} {filler} {length}")
            samples = make_task_set(task, filler, length, num_samples_at(args, length), args.seed,
                                    tokenizer=tokenizer, prompt_format=args.prompt_format)
            cell = run_cell(llm, samples, length)
            bar.update(len(samples))
            bar.set_postfix(last=f"{cell.accuracy:.0%}")
            yield cell


def markdown(args: argparse.Namespace, cells: list[Cell], setup: dict[str, str], info: dict[str, Any]) -> str:
    """Accuracy per task and filler (rows) and length (columns), then how it was measured."""
    by_key = {(cell.task, cell.filler, cell.length): cell for cell in cells}
    lines = ["| task | filler | " + " | ".join(f"{length} tokens" for length in args.lengths) + " |",
             "|---|---|" + "---|" * len(args.lengths)]
    for task in args.tasks:
        for filler in args.fillers:
            row = [by_key.get((task, filler, length)) for length in args.lengths]
            lines.append(f"| {task} | {filler} | " + " | ".join(
                "-" if cell is None else f"{cell.accuracy:.0%} (n={len(cell.scores)})" for cell in row) + " |")
    lines += ["", *(f"- {line}" for line in machine_lines(info)), f"- {setup_line('model', setup)}",
              f"- prompts: engine/bench/retrieval_tasks.py, format {args.prompt_format}, seed {args.seed}; "
              "greedy; score = fraction of expected answers in the generated text "
              f"(niah_multivalue: {NUM_MULTI_NEEDLES} values)"]
    return "\n".join(lines) + "\n"


def save(args: argparse.Namespace, cells: list[Cell], setup: dict[str, str], info: dict[str, Any]) -> str:
    """Write the JSON and the markdown table of the cells measured so far; return the table."""
    table = markdown(args, cells, setup, info)
    args.save_result.parent.mkdir(parents=True, exist_ok=True)
    result = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "machine": info, "setup": setup, "cells": [asdict(cell) | {"accuracy": cell.accuracy} for cell in cells]}
    args.save_result.write_text(json.dumps(result, indent=1))
    args.save_result.with_suffix(".md").write_text(table)
    return table


def main() -> None:
    args = parse_args()
    from engine import LLM

    llm = LLM(args.model, max_num_batched_tokens=args.max_num_batched_tokens)
    setup, info = engine_setup(llm), machine()
    cells: list[Cell] = []
    table = ""
    for cell in run(args, llm):
        cells.append(cell)
        table = save(args, cells, setup, info)  # after every cell: a stopped run keeps what it measured
    print("\n" + table)
    print(f"wrote {args.save_result} and {args.save_result.with_suffix('.md')}")


if __name__ == "__main__":
    main()
