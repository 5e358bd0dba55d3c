"""ShareGPT conversations rendered through a model's chat template, split once into a calibration
part and a held-out part.

Both parts come from one seeded shuffle of ShareGPT's records (the order `sample_sharegpt` uses):

    shuffled records:  | 0 .. NUM_CALIBRATION_RECORDS - 1 | NUM_CALIBRATION_RECORDS .. end |
                         calibration (elastification)       held out (quality benchmarks)

so whatever calibrates on the first part is never evaluated on its own data.

A conversation is a record's first human/gpt exchange: the prompt is what `LLM.chat` would send
(system turn, user turn, the assistant header), the answer the assistant turn as the template
closes it, encoded after the prompt as generation would produce it.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from engine.bench.datasets import MIN_SHAREGPT_LEN, first_exchange, load_sharegpt

NUM_CALIBRATION_RECORDS = 2000  # the shuffled list's first records, left to calibration sets


@dataclass(frozen=True, slots=True)
class Conversation:
    prompt_token_ids: list[int]  # system + user turn + assistant header, as LLM.chat encodes them
    answer_token_ids: list[int]  # the assistant turn after them, cut to fit the sequence length

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.answer_token_ids


def shuffled_records(seed: int) -> list[dict[str, Any]]:
    """ShareGPT's records in the seeded order of `sample_sharegpt`."""
    records = load_sharegpt()
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    return [records[index] for index in order]


def held_out_conversations(tokenizer: Any, num_conversations: int, seed: int, max_seq_len: int) -> list[Conversation]:
    """The first `num_conversations` usable records of the shuffle past its first
    NUM_CALIBRATION_RECORDS.  A prompt may fill at most three quarters of `max_seq_len`, so that
    every answer keeps some tokens to score."""
    records = shuffled_records(seed)[NUM_CALIBRATION_RECORDS:]
    return _take(_rendered(tokenizer, records, max_seq_len), num_conversations, max_seq_len)


def calibration_conversations(tokenizer: Any, num_conversations: int, seed: int,
                              max_seq_len: int) -> list[Conversation]:
    """Like `held_out_conversations`, from the shuffle's first NUM_CALIBRATION_RECORDS only."""
    records = shuffled_records(seed)[:NUM_CALIBRATION_RECORDS]
    return _take(_rendered(tokenizer, records, max_seq_len), num_conversations, max_seq_len)


def _rendered(tokenizer: Any, records: list[dict[str, Any]], max_seq_len: int) -> Iterator[Conversation]:
    max_prompt_len = max_seq_len - max(MIN_SHAREGPT_LEN, max_seq_len // 4)
    for record in records:
        conversation = render(tokenizer, record, max_prompt_len, max_seq_len)
        if conversation is not None:
            yield conversation


def _take(conversations: Iterator[Conversation], num_conversations: int, max_seq_len: int) -> list[Conversation]:
    taken = [c for _, c in zip(range(num_conversations), conversations)]
    if len(taken) < num_conversations:
        raise ValueError(f"only {len(taken)} conversations fit {max_seq_len} tokens, {num_conversations} asked")
    return taken


def render(tokenizer: Any, record: dict[str, Any], max_prompt_len: int, max_seq_len: int) -> Conversation | None:
    """A record's first exchange through the chat template, or None when it has none or does not fit."""
    exchange = first_exchange(record)
    if exchange is None:
        return None
    question, answer = exchange
    messages = [{"role": "user", "content": question}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": answer}],
                                         add_generation_prompt=False)
    if not full.startswith(prompt):
        raise ValueError("the chat template renders the generation prompt differently from a finished turn: "
                         "the answer tokens cannot be told apart")
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    answer_ids = tokenizer.encode(full[len(prompt):], add_special_tokens=False)
    if len(prompt_ids) > max_prompt_len or len(answer_ids) < MIN_SHAREGPT_LEN:
        return None
    return Conversation(prompt_ids, answer_ids[:max_seq_len - len(prompt_ids)])
