"""What the engine hands back to its callers, shaped like vLLM's `RequestOutput`.

Text and token ids are cumulative: each RequestOutput for a request holds everything produced so
far.  Streaming callers diff against what they already sent.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class Logprob:
    logprob: float
    rank: int  # 1 = most likely token
    decoded_token: str


# One entry per generated token: the sampled token and the top-N alternatives, by token id.
SampleLogprobs = list[dict[int, Logprob]]
# One entry per prompt token, None for the first (nothing before it to score it): the prompt
# token and the top-N alternatives at its position, by token id.
PromptLogprobs = list[dict[int, Logprob] | None]


@dataclass(slots=True)
class RequestMetrics:
    """Wall-clock timestamps (time.time()) of one request's life, for latency metrics."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_preemptions: int = 0


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: SampleLogprobs | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    num_cached_tokens: int = 0
    # metrics of each of the n samples (same order as outputs) for per-sample latency stats
    sample_metrics: list[RequestMetrics] = field(default_factory=list)
    elastic_level: int = 100  # the submodel its last step ran (engine/elastic/spec.py)
    prompt_keep: float = 1.0  # the fraction of its prompt pruning kept (1.0: whole, or not pruned)
    elastic_auto: bool = False  # the server chose its level (and keep) under the load (issue #15)
    prompt_logprobs: PromptLogprobs | None = None  # when SamplingParams.prompt_logprobs asked for them
    # Prompt tokens that ran every layer: all of them, unless prompt pruning kept fewer.
    num_prompt_tokens_computed_in_full: int | None = None
    # Set when processing this request failed (finish_reason "error"): (reason, message).  The
    # request alone ended; the engine went on.
    error: tuple[str, str] | None = None
