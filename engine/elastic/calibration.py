"""Calibration and development token sequences for elastification, as padded [B, T] batches.

Calibration: ShareGPT conversations (first exchange, through the model's chat template) from the
first NUM_CALIBRATION_RECORDS records of the seeded shuffle `sample_sharegpt` uses; every token
after the first is scored (the prompt too: importance and recovery fit the model's behaviour on
the whole conversation, not only its answers).  Development: `heldout_answer_sequences` is the
held-out set of benchmarks/weight_formats.py (records past those 2,000, answers scored), so the
figures here and there are the same measurement.  engine/bench/conversations.py does the split.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from engine.bench.conversations import Conversation, calibration_conversations, held_out_conversations

HELD_OUT_MAX_SEQ_LEN = 512  # benchmarks/weight_formats.py's default --max-seq-len
SEED = 0  # the shuffle seed of sample_sharegpt's default and of weight_formats.py


@dataclass(frozen=True)
class TokenBatch:
    """Right-padded sequences: input_ids [B, T] (pad 0, never attended by earlier rows: causal),
    scored [B, T - 1] bool, True where the token at t + 1 counts in a loss."""

    input_ids: torch.Tensor
    scored: torch.Tensor

    @property
    def num_scored(self) -> int:
        return int(self.scored.sum())


def default_tokenizer(model: str | None = None) -> Any:
    from engine.model.loader import load_tokenizer, resolve_model

    return load_tokenizer(resolve_model(model))


def calibration_sequences(tokenizer: Any, num_sequences: int, max_seq_len: int) -> list[Conversation]:
    """`num_sequences` calibration conversations of at most `max_seq_len` tokens."""
    return calibration_conversations(tokenizer, num_sequences, SEED, max_seq_len)


def heldout_answer_sequences(num_sequences: int, tokenizer: Any = None,
                             max_seq_len: int = HELD_OUT_MAX_SEQ_LEN) -> list[Conversation]:
    """The first `num_sequences` held-out conversations of benchmarks/weight_formats.py."""
    return held_out_conversations(tokenizer or default_tokenizer(), num_sequences, SEED, max_seq_len)


def batches(conversations: Sequence[Conversation], batch_size: int, answers_only: bool) -> Iterator[TokenBatch]:
    """The conversations in batches, longest first (less padding); `answers_only` scores only the
    answer tokens (perplexity), else every token after the first (calibration)."""
    ordered = sorted(conversations, key=lambda c: -len(c.token_ids))
    for start in range(0, len(ordered), batch_size):
        yield pad(ordered[start:start + batch_size], answers_only)


def pad(conversations: Sequence[Conversation], answers_only: bool) -> TokenBatch:
    length = max(len(c.token_ids) for c in conversations)
    input_ids = torch.zeros(len(conversations), length, dtype=torch.long)
    scored = torch.zeros(len(conversations), length - 1, dtype=torch.bool)
    for row, conversation in enumerate(conversations):
        token_ids = conversation.token_ids
        input_ids[row, :len(token_ids)] = torch.tensor(token_ids)
        # scored[t] is about token t + 1: answers start at token len(prompt).
        first = len(conversation.prompt_token_ids) - 1 if answers_only else 0
        scored[row, first:len(token_ids) - 1] = True
    return TokenBatch(input_ids, scored)
