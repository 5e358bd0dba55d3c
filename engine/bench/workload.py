"""The requests a benchmark sends, from the dataset flags `engine bench serve` and `engine bench
simulate` share: which tokenizer counts their tokens, and which dataset samples them."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from engine.bench import datasets

if TYPE_CHECKING:
    from engine.tokenizer.tokenizer import Tokenizer

DATASETS = ("sharegpt", "random", "long", "prefix")


def load_tokenizer(path: str | None) -> Tokenizer:
    """The tokenizer of a GGUF file or HF directory (default: the engine's default model)."""
    from engine.model.loader import load_tokenizer as load, resolve_model  # torch: only when asked

    return load(resolve_model(path))


def sample_requests(args: argparse.Namespace, tokenizer: Any, num_requests: int,
                    max_model_len: int) -> list[datasets.SampleRequest]:
    """`num_requests` requests of the dataset `args.dataset`, with its length flags."""
    cap = args.max_output_tokens
    if cap is not None and cap < 1:
        raise ValueError(f"--max-output-tokens must be positive, got {cap}")
    if args.dataset == "sharegpt":
        return datasets.sample_sharegpt(tokenizer, num_requests, seed=args.seed, max_prompt_len=args.max_prompt_len,
                                        max_model_len=max_model_len, fixed_output_len=args.sharegpt_output_len,
                                        max_output_len=cap)
    if args.dataset == "prefix":
        return datasets.sample_prefix(tokenizer, num_requests, args.prefix_len, args.num_prefixes, seed=args.seed,
                                      max_prompt_len=args.max_prompt_len, max_model_len=max_model_len,
                                      fixed_output_len=args.sharegpt_output_len, max_output_len=cap)
    if args.dataset == "random":
        requests = datasets.sample_random(tokenizer, num_requests, args.random_input_len, args.random_output_len,
                                          args.random_range_ratio, seed=args.seed)
        return datasets.cap_output_lens(requests, cap)
    output_len = min(args.long_output_len, cap or args.long_output_len)
    if args.long_input_len + output_len > max_model_len:
        raise ValueError(f"--long-input-len {args.long_input_len} + {output_len} output tokens exceed "
                         f"the model length {max_model_len}: lower --long-input-len")
    return datasets.sample_long(tokenizer, num_requests, args.long_input_len, output_len, seed=args.seed)
