"""Prompt pruning's token accounting: how a pruned request's tokens split between the KV groups.

Progressive pruning (LazyLLM's, within one step): the model is cut at prune layers l_1 < ... < l_S
into KV groups, group 0 = layers [0, l_1), group s = layers [l_s, l_{s+1}) (l_{S+1} = L),
engine/kv/kv_cache_groups.py.  A pruned request with P prompt tokens keeps K_s of them in group s,
P > K_1 >= ... >= K_S = K (each stage keeps a subset of the previous stage's tokens):

    all tokens:  | sinks | prompt ......................... | window | output ........ |
                 0       S                        P - window       P                  num_tokens
    group 0:     every token, chunked as today; its progress is num_computed_tokens (c)
    group s:     | K_s kept prompt tokens, in position order  | output ........ |
                 0                                            K_s                K_s + num_tokens - P

so when group 0 has computed c tokens, group s has computed

    num_kept(c, s) = 0                c <  P    (stage A: the deep groups wait for the score)
                   = K_s + c - P      c >= P    (every output token runs every layer)

The step whose chunk reaches P (the stage-B step) scores the prompt with the window's queries
at l_1, runs its K_1 kept tokens to l_2, scores those there, and so on: all deep groups' prompt
rows run in that one step (and the chunk's output tokens, when a preempted request is
recomputed).  A chunk never ends inside the window (`chunk_size`), so that step holds every query
of the score; a prefix-cache hit never reaches into it either (`max_match`).

Why two stages (measured on SmolLM2-135M; DEFAULT_PRUNE_LAYER_FRACTIONS): the window attention
that finds a needle hidden in natural text lives in layers 15-24, and is sharper the deeper it
is.  A first cut at l_1 = 15 to keep^(1/2) of the prompt, then a second at l_2 = 19 to keep,
keeps the needle as one cut at 19 would and costs about what one cut at 15 does.

Token budget: a pruned request's tokens cost what they compute.  A token that runs only group 0
costs f_0 = l_1 / L of a token; a row of group s costs f_s = (l_{s+1} - l_s) / L more:

    cost(c, n) = ceil(n * f_0 + sum over s of (num_kept(c + n, s) - num_kept(c, s)) * f_s)

so stage-A chunks are longer than the budget in tokens, and the stage-B step may overrun the step's
budget by the kept rows (once per request; the step is then full).  An unpruned request has no
plan: num_kept(c, s) == c, cost == n, as without pruning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# The prune layers as fractions of the model's depth where PromptPruningConfig names none.
# Measured on SmolLM2-135M (30 layers), keep 0.3, ShareGPT filler, each variant run alone
# (benchmarks/prompt_pruning.py --prune-layers L1,L2; benchmarks/README.md, "progressive pruning"):
#     prune layers            9 (one)   8,15    8,18    15,18   15,19   15,20
#     TTFT ratio at 2k        0.53*     0.42    -       0.60    0.61    -      (issue #14: <= 0.62)
#     passkey 1k              0.43*     0.97    -       1.00    1.00    -      (>= 0.75)
#     NIAH single 4k / full   0.33*     0.53    0.53    0.87    1.00    1.07   (>= 0.9; 20 samples)
# (* one stage, score window 32, before prefill attention ran fused.)  The window attention that
# finds a needle in natural text lives in layers 15-24 (benchmarks/prune_layer_study.py: below
# layer 12 no head recalls a NIAH needle at keep 0.5 more than half the time), so the first cut
# waits for layer 15; the second scores with layers 16-18, whose heads recall every needle.
# Prefill attention is the larger part of a long prompt's cost and falls with the square of what
# is kept, so the TTFT target holds there too.
DEFAULT_PRUNE_LAYER_FRACTIONS = (0.5, 0.63)


def default_prune_layers(num_layers: int) -> tuple[int, ...]:
    """The default prune layers for a model of this depth, ascending, each in [1, num_layers)."""
    layers = sorted({max(1, min(num_layers - 1, round(f * num_layers))) for f in DEFAULT_PRUNE_LAYER_FRACTIONS})
    return tuple(layers)


def parse_prune_layers(text: str) -> tuple[int, ...]:
    """--prune-layers: "9" or "9,15" (argparse type; a bad list is argparse's usage error)."""
    import argparse
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected layer numbers separated by commas, got {text!r}") from None


def stage_fractions(prune_layers: tuple[int, ...], num_layers: int) -> tuple[float, ...]:
    """f_s for s >= 1: each deep group's share of a token's compute (module docstring)."""
    bounds = (*prune_layers, num_layers)
    return tuple((end - start) / num_layers for start, end in zip(bounds, bounds[1:]))


@dataclass(frozen=True, slots=True)
class PrunePlan:
    """How many of a request's prompt tokens each deep group keeps; fixed when the request is added."""

    num_prompt_tokens: int  # P
    kept_per_stage: tuple[int, ...]  # K_1 >= ... >= K_S, sinks and window included; K_1 < P
    window: int  # the last prompt tokens: the score's queries end here, always kept
    fractions: tuple[float, ...]  # f_1 .. f_S: each deep group's share of a token's compute
    scoring: str = "attention"  # or "random": which tokens, not how many (engine/model/layers/prompt_pruning.py)
    score_window: int | None = None  # the last prompt tokens whose queries score (None: the whole window)

    @classmethod
    def make(cls, num_prompt_tokens: int, keep: float, *, min_prompt_tokens: int, num_sink_tokens: int,
             window: int, fractions: tuple[float, ...], scoring: str = "attention",
             score_window: int | None = None) -> PrunePlan | None:
        """The plan for a prompt at `keep`, or None where nothing would be pruned (keep 1, a short
        prompt, or a keep so high that every token stays).  Stage s of S keeps keep^(s / S) of
        the prompt: each stage drops the same share of what reaches it."""
        if keep >= 1 or num_prompt_tokens < min_prompt_tokens:
            return None
        floor, num_stages = num_sink_tokens + window, len(fractions)
        kept = tuple(min(num_prompt_tokens, max(floor, math.ceil(keep ** (s / num_stages) * num_prompt_tokens)))
                     for s in range(1, num_stages + 1))
        if kept[-1] >= num_prompt_tokens:
            return None
        return cls(num_prompt_tokens, kept, window, fractions, scoring, score_window)

    @property
    def num_kept_prompt_tokens(self) -> int:
        """K: the prompt tokens that run every layer."""
        return self.kept_per_stage[-1]

    @property
    def num_score_queries(self) -> int:
        return self.window if self.score_window is None else min(self.score_window, self.window)

    @property
    def deep_fraction(self) -> float:
        """The share of a token's compute past the first prune layer."""
        return sum(self.fractions)

    @property
    def num_pruned_tokens(self) -> int:
        return self.num_prompt_tokens - self.num_kept_prompt_tokens

    @property
    def window_start(self) -> int:
        return self.num_prompt_tokens - self.window

    def num_kept(self, num_computed_tokens: int, stage: int = -1) -> int:
        """Group `stage + 1`'s length (stage 0 the first deep group; -1 the last) when group 0
        holds num_computed_tokens (the diagram above)."""
        past_prompt = num_computed_tokens - self.num_prompt_tokens
        return 0 if past_prompt < 0 else self.kept_per_stage[stage] + past_prompt

    def max_match(self) -> int:
        """The most tokens a prefix-cache hit may cover: up to the window, whose queries score."""
        return self.window_start

    def is_stage_b_step(self, num_computed_tokens: int, num_scheduled_tokens: int) -> bool:
        return num_computed_tokens < self.num_prompt_tokens <= num_computed_tokens + num_scheduled_tokens

    def cost(self, num_computed_tokens: int, num_scheduled_tokens: int) -> int:
        """Budget tokens the chunk [c, c + n) costs (the formula above)."""
        c, end = num_computed_tokens, num_computed_tokens + num_scheduled_tokens
        deep = sum((self.num_kept(end, s) - self.num_kept(c, s)) * f for s, f in enumerate(self.fractions))
        # A decode costs exactly 1: the epsilon keeps float rounding (0.3 + 0.7) from making it 2.
        return math.ceil(num_scheduled_tokens * (1 - self.deep_fraction) + deep - 1e-9)

    def layer_counts(self, num_computed_tokens: int, num_scheduled_tokens: int) -> tuple[float, float, float]:
        """What the chunk [c, c + n) computes, in tokens of the whole model's layers: (token rows,
        keys its last row reads, query-key pairs as n * (c + n) counts them for a plain chunk).
        Group 0 runs every token through its share of the layers; group s runs its new kept rows
        (the stage-B step: all K_s of them) against its K_s-long keys through its share f_s."""
        c, end = num_computed_tokens, num_computed_tokens + num_scheduled_tokens
        shallow = 1 - self.deep_fraction
        rows, keys, pairs = num_scheduled_tokens * shallow, end * shallow, num_scheduled_tokens * end * shallow
        for stage, share in enumerate(self.fractions):
            before, after = self.num_kept(c, stage), self.num_kept(end, stage)
            rows += (after - before) * share
            keys += after * share
            pairs += (after - before) * after * share
        return rows, keys, pairs

    def widest_layer_counts(self, num_computed_tokens: int, num_scheduled_tokens: int) -> tuple[int, int]:
        """(rows, query-key pairs) of the layers that hold the most of the chunk [c, c + n): the
        model runner's one-call bounds test every layer, where layer_counts averages them."""
        c, end = num_computed_tokens, num_computed_tokens + num_scheduled_tokens
        rows, pairs = num_scheduled_tokens, num_scheduled_tokens * end
        for stage in range(len(self.fractions)):
            before, after = self.num_kept(c, stage), self.num_kept(end, stage)
            rows, pairs = max(rows, after - before), max(pairs, (after - before) * after)
        return rows, pairs

    def chunk_size(self, num_computed_tokens: int, num_tokens_to_compute: int, budget: int) -> int:
        """Tokens to schedule from c under `budget` (0: none this step).  Stage-A chunks run only
        the shallow layers, so the budget buys more of them; a chunk stops at the window's start
        rather than inside the window:

            c ........ P - window ...... P
                 ok ->|<- not an end ->|<- ok
        """
        c = num_computed_tokens
        if c >= self.num_prompt_tokens:  # decodes, and output tokens after the prompt
            return min(num_tokens_to_compute, budget)
        n = min(num_tokens_to_compute, math.floor(budget / (1 - self.deep_fraction)))
        if self.window_start < c + n < self.num_prompt_tokens:
            n = max(0, self.window_start - c)
        return n
