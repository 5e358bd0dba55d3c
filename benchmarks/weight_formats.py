"""Quality of the quantized weight formats against the dequantized model, in one run.

Each weight format (--weight-formats; "dequantized" is the reference) loads its own engine at
--dtype (float32 by default, so that only the weight format differs), one after another, and is
measured two ways on held-out ShareGPT conversations:

1. Perplexity of the assistant's answers, teacher-forced.  Each conversation's first human/gpt
   exchange is rendered with the model's chat template; the prompt is what `LLM.chat` would send
   (system turn, user turn, the assistant header), the scored tokens are the assistant turn as the
   template closes it, encoded after the prompt as generation would produce them:

       sequence:  | prompt (chat template, generation prompt) | answer + end of turn ... |
                  0                                          P                         L <= --max-seq-len
       scored:    token t for t in [P, L), predicted by the logits of row t - 1

   The whole sequence is one prefill through the engine's own model (a ForwardBatch built by the
   runner's builder, KV blocks from the engine's KV manager, freed after), the LM head on rows
   P - 1 .. L - 2 only.  Perplexity = exp(total NLL / total scored tokens) over all conversations.
2. Greedy agreement: the first --num-prompts of those prompts, --output-len greedy tokens each
   (EOS ignored) through `LLM.generate`; a prompt agrees when its tokens equal the dequantized
   model's, and the agreeing prefix is how many leading tokens do.

Held out: the conversations come from a seeded shuffle of ShareGPT (the order `sample_sharegpt`
uses) after its first 2,000 records, which calibration sets elsewhere may take.

    .venv/bin/python benchmarks/weight_formats.py
    .venv/bin/python benchmarks/weight_formats.py --num-conversations 4 --num-prompts 4   # quick

Writes --save-result (JSON), a markdown table beside it (.md) and a PNG (.png).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from engine.bench.conversations import NUM_CALIBRATION_RECORDS, Conversation, held_out_conversations
from engine.bench.datasets import MIN_SHAREGPT_LEN, load_sharegpt
from engine.bench.teacher_forcing import prefill_logits
from engine.config import DTYPES, WEIGHT_FORMATS
from peers.machine import engine_setup, machine, machine_lines

REPO_ROOT = Path(__file__).resolve().parent.parent
REFERENCE_FORMAT = "dequantized"
# Acceptance points of the weight-format issue (stated for "native"; every format is held to them).
MAX_PERPLEXITY_RATIO_DEVIATION = 0.005  # |ppl / ppl(dequantized) - 1|
MIN_IDENTICAL_FRACTION = 29 / 32  # of the prompts, greedy tokens identical to dequantized's


@dataclass(frozen=True, slots=True)
class FormatResult:
    """One weight format: how it loaded, its answers' NLL and its greedy tokens."""

    weight_format: str  # as asked
    setup: dict[str, str]  # dtype and weight format the engine resolved
    weights_bytes: int
    answer_nlls: list[float]  # summed NLL of each conversation's answer tokens
    num_scored_tokens: int
    greedy_token_ids: list[list[int]]

    @property
    def perplexity(self) -> float:
        return math.exp(sum(self.answer_nlls) / self.num_scored_tokens)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weight-formats", default="dequantized,native,int8",
                        help=f"comma-separated, {REFERENCE_FORMAT} among them (the reference)")
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    parser.add_argument("--model", default=None, help="GGUF file or HF directory; default: the bundled SmolLM2")
    parser.add_argument("--num-conversations", type=int, default=32, help="answers scored for perplexity")
    parser.add_argument("--num-prompts", type=int, default=32, help="prompts of the greedy-agreement check")
    parser.add_argument("--output-len", type=int, default=32, help="greedy tokens per prompt")
    parser.add_argument("--max-seq-len", type=int, default=512, help="prompt + scored answer tokens, at most")
    parser.add_argument("--seed", type=int, default=0, help="ShareGPT shuffle seed")
    parser.add_argument("--save-result", type=Path, default=REPO_ROOT / "benchmarks/results/weight_formats.json",
                        help="JSON; the .md table and .png plot go beside it")
    args = parser.parse_args()
    args.weight_formats = [name.strip() for name in args.weight_formats.split(",") if name.strip()]
    unknown = [name for name in args.weight_formats if name not in WEIGHT_FORMATS]
    if unknown:
        parser.error(f"unknown weight formats {unknown}; choose from {', '.join(WEIGHT_FORMATS)}")
    if REFERENCE_FORMAT not in args.weight_formats or len(set(args.weight_formats)) != len(args.weight_formats):
        parser.error(f"--weight-formats must name {REFERENCE_FORMAT!r} (the reference) and no format twice")
    if min(args.num_conversations, args.num_prompts, args.output_len) < 1 or args.max_seq_len < 4 * MIN_SHAREGPT_LEN:
        parser.error(f"counts must be positive and --max-seq-len at least {4 * MIN_SHAREGPT_LEN}")
    return args


# --- one weight format -----------------------------------------------------------------------

def answer_nll(llm: Any, conversation: Conversation) -> float:
    """Summed -log p of the answer tokens, the whole sequence as one prefill chunk through the model."""
    import torch

    # Row t - 1 predicts token t: the rows before each answer token.
    num_prompt, token_ids = len(conversation.prompt_token_ids), conversation.token_ids
    logits = prefill_logits(llm, token_ids, torch.arange(num_prompt - 1, len(token_ids) - 1))
    targets = torch.tensor(conversation.answer_token_ids, device=logits.device)
    logprobs = torch.log_softmax(logits.double(), dim=-1)
    return -float(logprobs.gather(1, targets[:, None]).sum())


def measure_format(args: argparse.Namespace, weight_format: str, scored: list[Conversation],
                   prompted: list[Conversation]) -> FormatResult:
    """Load the format's own engine, score `scored`'s answers, generate greedily from `prompted`."""
    from engine import LLM, SamplingParams

    print(f"\n== {weight_format}: loading")
    llm = LLM(args.model, dtype=args.dtype, weight_format=weight_format, kv_cache_memory=0.25)
    nlls = [answer_nll(llm, c) for c in tqdm(scored, desc=f"perplexity ({weight_format})")]
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": c.prompt_token_ids} for c in prompted], params, use_tqdm=True)
    return FormatResult(weight_format, engine_setup(llm), llm.memory_report()["weights_bytes"], nlls,
                        sum(len(c.answer_token_ids) for c in scored),
                        [list(output.outputs[0].token_ids) for output in outputs])


# --- comparison and report -------------------------------------------------------------------

def agreeing_prefix_len(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def compare(results: dict[str, FormatResult]) -> dict[str, dict[str, Any]]:
    """Each format's figures, and against the reference its perplexity ratio and greedy agreement."""
    reference = results[REFERENCE_FORMAT]
    figures = {}
    for name, result in results.items():
        prefixes = [agreeing_prefix_len(ours, theirs)
                    for ours, theirs in zip(result.greedy_token_ids, reference.greedy_token_ids)]
        figures[name] = {
            "setup": result.setup, "weights_bytes": result.weights_bytes, "perplexity": result.perplexity,
            "perplexity_ratio": result.perplexity / reference.perplexity,
            "num_scored_tokens": result.num_scored_tokens, "answer_nlls": result.answer_nlls,
            "num_prompts": len(prefixes),
            "num_identical": sum(ours == theirs for ours, theirs in zip(result.greedy_token_ids,
                                                                        reference.greedy_token_ids)),
            "mean_agreeing_prefix": sum(prefixes) / len(prefixes),
            "greedy_token_ids": result.greedy_token_ids,
        }
    return figures


def acceptance(figures: dict[str, dict[str, Any]]) -> list[str]:
    lines = []
    for name, f in figures.items():
        if name == REFERENCE_FORMAT:
            continue
        deviation = abs(f["perplexity_ratio"] - 1)
        verdict = "meets" if deviation <= MAX_PERPLEXITY_RATIO_DEVIATION else "MISSES"
        lines.append(f"{name} / {REFERENCE_FORMAT} perplexity = {f['perplexity_ratio']:.4f} "
                     f"({verdict} within {MAX_PERPLEXITY_RATIO_DEVIATION:.1%})")
        needed = math.ceil(MIN_IDENTICAL_FRACTION * f["num_prompts"])
        verdict = "meets" if f["num_identical"] >= needed else "MISSES"
        lines.append(f"{name}: {f['num_identical']} of {f['num_prompts']} prompts' greedy tokens identical to "
                     f"{REFERENCE_FORMAT}'s ({verdict} >= {needed})")
    return lines


HEADERS = ["weight format", "dtype", "weights MiB", "perplexity", f"/ {REFERENCE_FORMAT}", "identical greedy",
           "mean agreeing prefix"]


def table_rows(figures: dict[str, dict[str, Any]], output_len: int) -> list[list[str]]:
    return [[name, f["setup"]["dtype"], f"{f['weights_bytes'] / (1 << 20):.1f}", f"{f['perplexity']:.4f}",
             f"{f['perplexity_ratio']:.4f}", f"{f['num_identical']} / {f['num_prompts']}",
             f"{f['mean_agreeing_prefix']:.1f} / {output_len}"] for name, f in figures.items()]


def notes(args: argparse.Namespace, report: dict[str, Any]) -> list[str]:
    some = next(iter(report["formats"].values()))
    return machine_lines(report["machine"]) + [
        f"perplexity: {args.num_conversations} held-out ShareGPT answers (seed {args.seed}, records past the "
        f"shuffle's first {NUM_CALIBRATION_RECORDS:,}), {some['num_scored_tokens']} scored tokens, "
        f"sequences of at most {args.max_seq_len} tokens",
        f"greedy agreement: {some['num_prompts']} of those prompts, {args.output_len} tokens each, EOS ignored",
    ]


def print_report(rows: list[list[str]], lines: list[str]) -> None:
    widths = [max(len(header), *(len(row[i]) for row in rows)) for i, header in enumerate(HEADERS)]
    print("\n" + "  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(HEADERS, widths))))
    for row in rows:
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))))
    print()
    for line in lines:
        print(line)


def markdown(rows: list[list[str]], lines: list[str]) -> str:
    table = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    table += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(table + [""] + [f"- {line}" for line in lines]) + "\n"


def plot(figures: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    """Perplexity per format (ratio to the reference above each bar) and greedy prompts identical."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(figures)
    colors = [f"C{i}" for i in range(len(names))]
    fig, (ppl, agree) = plt.subplots(1, 2, figsize=(9, 3.6))
    drawn = ppl.bar(names, [f["perplexity"] for f in figures.values()], color=colors)
    ppl.bar_label(drawn, labels=[f"{f['perplexity']:.3f}\n({f['perplexity_ratio']:.4f}x)" for f in figures.values()],
                  fontsize=8)
    ppl.set_ylabel("answer perplexity")
    ppl.margins(y=0.2)
    drawn = agree.bar(names, [f["num_identical"] for f in figures.values()], color=colors)
    agree.bar_label(drawn, labels=[f"{f['num_identical']} (prefix {f['mean_agreeing_prefix']:.1f})"
                                   for f in figures.values()], fontsize=8)
    agree.set_ylabel(f"prompts identical to {REFERENCE_FORMAT}")
    agree.set_ylim(0, next(iter(figures.values()))["num_prompts"] * 1.15)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save(args: argparse.Namespace, figures: dict[str, dict[str, Any]]) -> None:
    report = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "machine": machine(), "formats": figures}
    report["acceptance"] = acceptance(figures)
    lines = notes(args, report) + report["acceptance"]
    rows = table_rows(figures, args.output_len)
    print_report(rows, lines)
    path = args.save_result
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    path.with_suffix(".md").write_text(markdown(rows, lines))
    mask = report["machine"]["isa_mask"]
    title = (f"weight formats against {REFERENCE_FORMAT}, {args.dtype}; {report['machine']['cpu_model']}"
             f"{f' masked to {mask}' if mask else ''}")
    plot(figures, path.with_suffix(".png"), title)
    print(f"\nsaved {path}, {path.with_suffix('.md').name} and {path.with_suffix('.png').name}")


def main() -> None:
    args = parse_args()
    from engine.model.loader import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(resolve_model(args.model))
    conversations = held_out_conversations(tokenizer, max(args.num_conversations, args.num_prompts), args.seed,
                                           args.max_seq_len)
    load_sharegpt.cache_clear()  # the parsed dataset (~200 MB) is not needed past sampling
    scored, prompted = conversations[:args.num_conversations], conversations[:args.num_prompts]
    results: dict[str, FormatResult] = {}
    for weight_format in args.weight_formats:
        results[weight_format] = measure_format(args, weight_format, scored, prompted)
        gc.collect()  # the engine just measured is unreferenced now: free it before the next one loads
    save(args, compare(results))


if __name__ == "__main__":
    main()
