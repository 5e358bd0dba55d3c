"""Prompt logprobs (vLLM's `prompt_logprobs`): score each prompt token by the logits of the row
before it, as the prompt's chunks are computed.

With P prompt tokens, the row at position p scores prompt token p + 1; the row at P - 1 samples
the first output token, as for any request, and scores nothing here:

    prompt tokens:   | t0 | t1 | ... | t{P-2} | t{P-1} |
    row position:      0    1          P-2      P-1
    scores:           t1   t2          t{P-1}   (samples the first output token)
    buffer entry:      0    1          P-2

A chunk of rows [c, c + n) scores prompt tokens c + 1 .. min(c + n, P - 1) into buffer entries
[c, min(c + n, P - 1)); its last row scores the next chunk's first token, which is known: it is
in the prompt.  Chunks arrive in order from position 0 (the scheduler skips prefix-cache lookups
for these requests, and a preemption drops the buffer with the rest of the runner's state), so
the buffer fills front to back.  It goes out whole in the step that samples the first token.

PERF: rows go through the LM head a slice at a time, so at most [_MAX_ROWS_PER_SLICE, vocab]
fp32 logits exist at once (12 MiB on a 49k vocabulary), whatever the prompt's length.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.scheduler.output import PromptLogprobsLists, ScheduledRequest

_MAX_ROWS_PER_SLICE = 64


@dataclass(slots=True)
class PromptLogprobsBuffer:
    """One request's prompt logprobs, filled chunk by chunk; entry j scores prompt token j + 1."""

    logprobs: torch.Tensor  # [P - 1] float32
    ranks: torch.Tensor  # [P - 1] int64, 1 = the most likely token
    top_token_ids: torch.Tensor  # [P - 1, num_top] int64
    top_logprobs: torch.Tensor  # [P - 1, num_top] float32
    num_scored: int = 0  # entries [0, num_scored) are filled

    @classmethod
    def empty(cls, num_prompt_tokens: int, num_top: int) -> PromptLogprobsBuffer:
        num_entries = num_prompt_tokens - 1
        return cls(torch.empty(num_entries), torch.empty(num_entries, dtype=torch.int64),
                   torch.empty(num_entries, num_top, dtype=torch.int64), torch.empty(num_entries, num_top))

    @property
    def num_top(self) -> int:
        return self.top_token_ids.shape[1]

    def fill(self, start: int, logprobs: torch.Tensor, ranks: torch.Tensor, top_token_ids: torch.Tensor,
             top_logprobs: torch.Tensor) -> None:
        """Entries [start, start + len(logprobs)), from tensors on any device."""
        if start != self.num_scored:
            raise AssertionError(f"prompt logprobs scored from entry {start}, expected {self.num_scored}: "
                                 "a chunk was skipped (a prefix-cache hit?)")
        end = start + logprobs.shape[0]
        self.logprobs[start:end].copy_(logprobs)
        self.ranks[start:end].copy_(ranks)
        self.top_token_ids[start:end].copy_(top_token_ids)
        self.top_logprobs[start:end].copy_(top_logprobs)
        self.num_scored = end

    def to_lists(self) -> PromptLogprobsLists:
        if self.num_scored != self.logprobs.shape[0]:
            raise AssertionError(f"prompt logprobs sent with {self.num_scored} of {self.logprobs.shape[0]} scored")
        return PromptLogprobsLists(self.logprobs.tolist(), self.ranks.tolist(), self.top_token_ids.tolist(),
                                   self.top_logprobs.tolist())


def score_prompt_chunk(compute_logits: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor,
                       item: ScheduledRequest, first_row: int, prompt_token_ids: list[int],
                       buffer: PromptLogprobsBuffer) -> None:
    """Score the prompt tokens this step's rows of one request predict (see the diagram above);
    `first_row` is the request's first row in `hidden`."""
    start = item.num_computed_tokens
    end = min(start + item.num_scheduled_tokens, len(prompt_token_ids) - 1)
    for first in range(start, end, _MAX_ROWS_PER_SLICE):
        last = min(first + _MAX_ROWS_PER_SLICE, end)
        rows = hidden[first_row + first - start: first_row + last - start]
        targets = torch.tensor(prompt_token_ids[first + 1: last + 1], device=hidden.device)
        logprobs = torch.log_softmax(compute_logits(rows).float(), dim=-1)
        target_logprobs = logprobs.gather(1, targets[:, None])
        ranks = (logprobs > target_logprobs).sum(dim=-1) + 1
        top = logprobs.topk(buffer.num_top, dim=-1)
        buffer.fill(first, target_logprobs[:, 0], ranks, top.indices, top.values)
