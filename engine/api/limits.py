"""What one request may ask of the server: caps on body size, prompts, samples, logprobs and stop
strings, each a flag of `engine serve` (add_limit_arguments), checked while the body is
translated (serving_common.py): a request over a cap gets a 400 (413 for the body) naming the
field, before it costs the engine anything.  The prompt's own length is capped by the context
window (--max-model-len)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields

from engine.sampling_params import MAX_LOGPROBS


@dataclass(frozen=True)
class RequestLimits:
    max_body_bytes: int = 8 * 1024 * 1024  # a full context of token ids as JSON is well under 1 MiB
    max_n: int = 128  # samples per prompt; OpenAI's own limit
    max_num_prompts: int = 256  # prompts in one completion request
    max_stop_strings: int = 64
    max_stop_string_chars: int = 1024  # each stop string; the detokenizer checks them every token
    max_logprobs: int = MAX_LOGPROBS  # top alternatives per token (logprobs, top_logprobs, prompt_logprobs)

    def __post_init__(self) -> None:
        for field in fields(self):
            if getattr(self, field.name) < 1:
                raise ValueError(f"{field.name} must be at least 1, got {getattr(self, field.name)}")
        if self.max_logprobs > MAX_LOGPROBS:
            raise ValueError(f"max_logprobs is at most {MAX_LOGPROBS} (the engine's own cap), got {self.max_logprobs}")


def add_limit_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = RequestLimits()
    for field in fields(RequestLimits):
        flag = "--" + field.name.replace("_", "-")
        parser.add_argument(flag, type=int, default=getattr(defaults, field.name),
                            help=f"refuse requests over this (default {getattr(defaults, field.name)})")


def limits_from_args(args: argparse.Namespace) -> RequestLimits:
    return RequestLimits(**{field.name: getattr(args, field.name) for field in fields(RequestLimits)})
