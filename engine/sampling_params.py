"""Per-request sampling settings, shaped like vLLM's `SamplingParams`."""

from __future__ import annotations

from dataclasses import dataclass, field

# A logprobs request above this is refused: each alternative costs a top-k over the vocabulary.
MAX_LOGPROBS = 20
# Temperatures under this sample greedily (vLLM's _SAMPLING_EPS).
GREEDY_BELOW = 1e-5


@dataclass(slots=True)
class SamplingParams:
    """How to pick each next token and when to stop.

    temperature == 0 means greedy.  `seed` makes one request's samples reproducible whatever
    else shares its batch.  `stop` strings are matched on the detokenized text, across token
    boundaries, and never appear in the output.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None  # number of top alternatives besides the sampled token
    # vLLM's: for each prompt token after the first, its logprob and this many top alternatives
    # (None: off).  A request asking for them never starts from prefix-cache hits.
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    stop_strings: list[str] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop_strings = [self.stop]
        else:
            self.stop_strings = [s for s in (self.stop or []) if s]
        if self.top_k == -1:
            self.top_k = 0
        self._validate()

    def _validate(self) -> None:
        checks = [
            (self.n >= 1, "n", f"n must be at least 1, got {self.n}"),
            (self.temperature >= 0.0, "temperature", f"temperature must be non-negative, got {self.temperature}"),
            (0.0 < self.top_p <= 1.0, "top_p", f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= 0, "top_k", f"top_k must be -1 (off) or positive, got {self.top_k}"),
            (0.0 <= self.min_p <= 1.0, "min_p", f"min_p must be in [0, 1], got {self.min_p}"),
            (-2.0 <= self.presence_penalty <= 2.0, "presence_penalty",
             f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty",
             f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            (self.repetition_penalty > 0.0, "repetition_penalty",
             f"repetition_penalty must be positive, got {self.repetition_penalty}"),
            (self.max_tokens is None or self.max_tokens >= 1, "max_tokens",
             f"max_tokens must be at least 1, got {self.max_tokens}"),
            (self.min_tokens >= 0, "min_tokens", f"min_tokens must be non-negative, got {self.min_tokens}"),
            (self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens",
             f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})"),
            (self.seed is None or -(2**63) <= self.seed < 2**63, "seed",
             f"seed must fit in a signed 64-bit integer, got {self.seed}"),
            (self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS, "logprobs",
             f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}"),
            (self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= MAX_LOGPROBS, "prompt_logprobs",
             f"prompt_logprobs must be in [0, {MAX_LOGPROBS}], got {self.prompt_logprobs}"),
        ]
        for ok, param, message in checks:
            if not ok:
                raise SamplingParamsError(message, param)

    @property
    def is_greedy(self) -> bool:
        # vLLM's rule: a temperature under GREEDY_BELOW samples greedily.  Dividing by one that
        # float32 rounds to zero would make the best logit NaN.
        return self.temperature < GREEDY_BELOW

    @property
    def has_penalties(self) -> bool:
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.repetition_penalty != 1.0)

    def for_child(self, index: int) -> SamplingParams:
        """The params of the index-th of n samples: n=1, and a distinct derived seed."""
        child = SamplingParams(**{name: getattr(self, name) for name in _INIT_FIELDS})
        child.n = 1
        if self.seed is not None:  # wrapped so the derived seed stays a signed 64-bit integer
            child.seed = (self.seed + index + 2**63) % 2**64 - 2**63
        return child


class SamplingParamsError(ValueError):
    """A sampling parameter out of range; `param` names it for OpenAI-style error bodies."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


_INIT_FIELDS = [name for name in SamplingParams.__dataclass_fields__ if name != "stop_strings"]
