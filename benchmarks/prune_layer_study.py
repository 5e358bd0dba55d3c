"""Where can prompt pruning score?  Needle recall of the window-attention score at every candidate
prune layer l*, offline, with the fp32 torch model (engine/elastic/torch_model.py).

For each sample of a retrieval cell (engine/bench/retrieval_tasks.py) the full model runs once and
the attention of the last `window` prompt queries is kept at every layer.  The engine's scoring
(engine/model/layers/prompt_pruning.py) is then replayed for each l*: the score layers
[l* - n, l*), heads and window queries summed, max-pooled, sinks and window always kept.  A
sample's needle is recalled when every token of its answer value is kept.  Recall bounds what the
deep layers can answer: the engine's accuracy at a prune layer (benchmarks/prompt_pruning.py
--prune-layer L) follows it.  Per head, recall at the layers below the deepest l* shows whether
any shallow head could point at the needle on its own.

    .venv/bin/python benchmarks/prune_layer_study.py                           # passkey, ShareGPT filler, 1k
    .venv/bin/python benchmarks/prune_layer_study.py --task niah_single --length 2048 --num-samples 20

Writes --output .md (tables) and .png (recall against l* per keep).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from engine.bench.retrieval_tasks import RetrievalSample, make_task_set
from engine.config import PromptPruningConfig
from engine.elastic.calibration import default_tokenizer
from engine.elastic.torch_model import Site, TorchLlama
from engine.model.layers.rotary import apply_rotary

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULTS = PromptPruningConfig()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="passkey")
    parser.add_argument("--filler", default="sharegpt")
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--num-samples", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0, help="the set's seed (benchmarks/prompt_pruning.py uses 0)")
    parser.add_argument("--keeps", default="0.3,0.5,0.7")
    parser.add_argument("--num-score-layers", type=int, default=DEFAULTS.num_score_layers)
    parser.add_argument("--pool-size", type=int, default=DEFAULTS.pool_size)
    parser.add_argument("--window", type=int, default=DEFAULTS.window)
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "benchmarks/results/prune_layer_study")
    args = parser.parse_args()
    args.keeps = [float(k) for k in args.keeps.split(",")]
    return args


def needle_positions(sample: RetrievalSample, tokenizer, num_tokens: int) -> list[int]:
    """Token positions of the first needle's answer value in the prompt as the engine encodes it."""
    encoding = tokenizer.backend.encode(sample.prompt, add_special_tokens=False)
    shift = num_tokens - len(encoding.ids)  # a BOS the engine adds
    start = sample.prompt.index(sample.needles[0]) + sample.needles[0].index(sample.answers[0])
    end = start + len(sample.answers[0])
    return [i + shift for i, (a, b) in enumerate(encoding.offsets) if a < end and b > start]


def window_attention(model: TorchLlama, input_ids: torch.Tensor, window: int) -> list[torch.Tensor]:
    """Per layer [Hkv, G, window, P]: the last `window` queries' attention probabilities (fp32)."""
    config, num_tokens = model.config, input_ids.shape[1]
    group, head_dim = config.num_heads // config.num_kv_heads, config.head_dim
    cos, sin = model.rope(num_tokens)
    future = torch.arange(num_tokens)[None] > torch.arange(num_tokens - window, num_tokens)[:, None]
    per_layer: list[torch.Tensor] = []

    def capture(index: int, site: Site, x: torch.Tensor) -> None:
        if site is not Site.ATTN_INPUT:
            return
        prefix = f"model.layers.{index}.self_attn."
        q = (x[0, -window:] @ model.weights[prefix + "q_proj.weight"].T).view(window, config.num_heads, head_dim)
        k = (x[0] @ model.weights[prefix + "k_proj.weight"].T).view(num_tokens, config.num_kv_heads, head_dim)
        q, k = apply_rotary(q, cos[-window:], sin[-window:]), apply_rotary(k, cos, sin)
        logits = torch.einsum("wkgd,pkd->kgwp", q.view(window, config.num_kv_heads, group, head_dim), k)
        per_layer.append(torch.softmax((logits * head_dim ** -0.5).masked_fill(future, float("-inf")), dim=-1))

    with torch.no_grad():
        model.hidden_states(input_ids, capture=capture)
    return per_layer


def kept_by_score(score: torch.Tensor, keep: float, args: argparse.Namespace) -> set[int]:
    """The engine's choice (PromptPruner.choose) for a summed score [P]."""
    num_tokens, sinks = score.shape[0], DEFAULTS.num_sink_tokens
    pooled = F.max_pool1d(score[None, None], args.pool_size, stride=1, padding=args.pool_size // 2)[0, 0]
    num_middle = int(num_tokens * keep) - sinks - args.window
    middle = pooled[sinks:num_tokens - args.window]
    top = torch.argsort(middle, descending=True, stable=True)[:num_middle] + sinks
    return set(range(sinks)) | set(top.tolist()) | set(range(num_tokens - args.window, num_tokens))


def recall(samples: list[tuple[list[int], list[torch.Tensor]]], scores_of, keep: float, args) -> float:
    hits = sum(set(needle) <= kept_by_score(scores_of(probs), keep, args) for needle, probs in samples)
    return hits / len(samples)


def main() -> None:
    args = parse_args()
    model, tokenizer = TorchLlama.load(), default_tokenizer()
    torch_samples = make_task_set(args.task, args.filler, args.length, args.num_samples, args.seed, tokenizer=tokenizer)
    samples = []
    for sample in tqdm(torch_samples, desc=f"{args.task} {args.filler} {args.length}: attention per layer"):
        ids = torch.tensor([tokenizer.encode(sample.prompt)])
        samples.append((needle_positions(sample, tokenizer, ids.shape[1]), window_attention(model, ids, args.window)))
    num_layers, n = model.config.num_layers, args.num_score_layers
    prune_layers = list(range(n, num_layers + 1, 3))
    def summed(lstar: int):
        return lambda probs: sum(probs[i].sum(dim=(0, 1, 2)) for i in range(lstar - n, lstar))

    def one_head(layer: int, head: int):
        return lambda probs: probs[layer].flatten(0, 1)[head].sum(0)

    table = {keep: [recall(samples, summed(lstar), keep, args) for lstar in prune_layers] for keep in args.keeps}
    heads = [[recall(samples, one_head(layer, h), min(args.keeps), args) for h in range(model.config.num_heads)]
             for layer in range(num_layers)]
    report = markdown(args, prune_layers, table, heads)
    print(report)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".md").write_text(report)
    plot(args, prune_layers, table, args.output.with_suffix(".png"))


def markdown(args, prune_layers: list[int], table: dict[float, list[float]], heads: list[list[float]]) -> str:
    lines = [f"# Needle recall by prune layer: {args.task}, {args.filler} filler, {args.length} tokens, "
             f"{args.num_samples} samples (seed {args.seed})", "",
             f"Score layers [l* - {args.num_score_layers}, l*), pool {args.pool_size}, window {args.window}; "
             "fp32 torch model.", "",
             "| keep | " + " | ".join(f"l*={lstar}" for lstar in prune_layers) + " |",
             "|---|" + "---|" * len(prune_layers)]
    lines += [f"| {keep} | " + " | ".join(f"{r:.2f}" for r in row) + " |" for keep, row in table.items()]
    lines += ["", f"Per query head (grouped order), recall at keep {min(args.keeps)} from that head alone:", "",
              "| layer | " + " | ".join(f"h{h}" for h in range(len(heads[0]))) + " | best |",
              "|---|" + "---|" * (len(heads[0]) + 1)]
    lines += [f"| {layer} | " + " | ".join(f"{r:.2f}" for r in row) + f" | {max(row):.2f} |"
              for layer, row in enumerate(heads)]
    return "\n".join(lines) + "\n"


def plot(args, prune_layers: list[int], table: dict[float, list[float]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for keep, row in table.items():
        ax.plot(prune_layers, row, "o-", label=f"keep {keep}")
    ax.set_xlabel("prune layer l*")
    ax.set_ylabel("needle recall")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title(f"{args.task} {args.filler} {args.length}: needle kept at l*", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
