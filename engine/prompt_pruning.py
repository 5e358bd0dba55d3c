"""Prompt pruning's token accounting: how a pruned request's tokens split between the KV groups.

Layers [0, l*) keep KV for every token (group A); layers [l*, L) only for the kept ones (group B),
engine/kv/kv_cache_groups.py.  A pruned request with P prompt tokens of which K are kept:

    all tokens:  | sinks | prompt ......................... | window | output ........ |
                 0       S                        P - window       P                  num_tokens
    group A:     every token, chunked as today; its progress is num_computed_tokens (c)
    group B:     | K kept prompt tokens, in position order  | output ........ |
                 0                                          K                  K + num_tokens - P

so when group A has computed c tokens, group B has computed

    num_kept(c) = 0              c <  P    (stage A: group B waits for the score)
                = K + c - P      c >= P    (every output token runs every layer)

The step whose chunk reaches P (the stage-B step) scores the prompt with the window's queries,
then runs the K kept prompt tokens (and the chunk's output tokens, when a preempted request is
recomputed) through [l*, L).  A chunk never ends inside the window (`chunk_size`), so that step
holds every query of the score; a prefix-cache hit never reaches into it either (`max_match`).

Token budget: a pruned request's tokens cost what they compute.  A token that runs only layers
below l* costs (1 - deep_fraction) of a token; a row of group B costs deep_fraction more:

    cost(c, n) = ceil(n * (1 - d) + (num_kept(c + n) - num_kept(c)) * d)      d = (L - l*) / L

so stage-A chunks are longer than the budget in tokens, and the stage-B step may overrun the step's
budget by the K kept rows (once per request; the step is then full).  An unpruned request has no
plan: num_kept(c) == c, cost == n, as without pruning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# The prune layer l* as a fraction of the model's depth where PromptPruningConfig names none.
# Measured on SmolLM2-135M (30 layers, so l* = 9), 2k-token prompts, keep 0.3, scoring included
# (benchmarks/prompt_pruning.py --prune-layer L, one request at a time, quiet 2-core CPU):
#     l*           9      12     15     18
#     TTFT ratio   0.53   0.60   0.67   0.77     (issue #14: <= 0.62)
# so the TTFT targets need l* <= 12.  But where the needle hides in natural text (ShareGPT filler),
# the window attention of layers below 12 does not find it: passkey at 1k, keep 0.3, engine
# accuracy 43% / 13% / 57% / 97% at those l* (needle recall from the fp32 model's attention,
# benchmarks/prune_layer_study.py: 0.27 / 0.13 / 0.50 / 0.93; no single head below layer 12
# recalls more than 0.40).  With repeated filler l* = 9 keeps the needle every time.  A one-stage
# prune layer cannot have both; a progressive scheme (a first cut at ~9, the final one at ~18)
# is the next step (issue #14's "progressive pruning at several layers").
DEFAULT_PRUNE_LAYER_FRACTION = 0.3


def default_prune_layer(num_layers: int) -> int:
    return max(1, min(num_layers - 1, round(DEFAULT_PRUNE_LAYER_FRACTION * num_layers)))


@dataclass(frozen=True, slots=True)
class PrunePlan:
    """How many of a request's prompt tokens group B keeps; fixed when the request is added."""

    num_prompt_tokens: int  # P
    num_kept_prompt_tokens: int  # K, sinks and window included; < P
    window: int  # the last prompt tokens: the score's queries, always kept
    deep_fraction: float  # (L - l*) / L: the share of a token's compute that runs in group B, < 1
    scoring: str = "attention"  # or "random": which tokens, not how many (engine/model/layers/prompt_pruning.py)

    @classmethod
    def make(cls, num_prompt_tokens: int, keep: float, *, min_prompt_tokens: int, num_sink_tokens: int,
             window: int, deep_fraction: float, scoring: str = "attention") -> PrunePlan | None:
        """The plan for a prompt at `keep`, or None where nothing would be pruned (keep 1, a short
        prompt, or a keep so high that every token stays)."""
        if keep >= 1 or num_prompt_tokens < min_prompt_tokens:
            return None
        num_kept = max(num_sink_tokens + window, math.ceil(keep * num_prompt_tokens))
        if num_kept >= num_prompt_tokens:
            return None
        return cls(num_prompt_tokens, num_kept, window, deep_fraction, scoring)

    @property
    def num_pruned_tokens(self) -> int:
        return self.num_prompt_tokens - self.num_kept_prompt_tokens

    @property
    def window_start(self) -> int:
        return self.num_prompt_tokens - self.window

    def num_kept(self, num_computed_tokens: int) -> int:
        """Group B's length when group A holds num_computed_tokens (the diagram above)."""
        past_prompt = num_computed_tokens - self.num_prompt_tokens
        return 0 if past_prompt < 0 else self.num_kept_prompt_tokens + past_prompt

    def max_match(self) -> int:
        """The most tokens a prefix-cache hit may cover: up to the window, whose queries score."""
        return self.window_start

    def is_stage_b_step(self, num_computed_tokens: int, num_scheduled_tokens: int) -> bool:
        return num_computed_tokens < self.num_prompt_tokens <= num_computed_tokens + num_scheduled_tokens

    def cost(self, num_computed_tokens: int, num_scheduled_tokens: int) -> int:
        """Budget tokens the chunk [c, c + n) costs (the formula above)."""
        num_rows_b = self.num_kept(num_computed_tokens + num_scheduled_tokens) - self.num_kept(num_computed_tokens)
        # A decode costs exactly 1: the epsilon keeps float rounding (0.3 + 0.7) from making it 2.
        return math.ceil(num_scheduled_tokens * (1 - self.deep_fraction) + num_rows_b * self.deep_fraction - 1e-9)

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
