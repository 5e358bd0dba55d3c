"""The typed messages between scheduler and runner."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.request import Request


@dataclass(slots=True)
class ScheduledRequest:
    """Run tokens [num_computed_tokens, num_computed_tokens + num_scheduled_tokens) of `request`
    this step; if that reaches the request's last token, sample the next one."""

    request: Request
    num_computed_tokens: int
    num_scheduled_tokens: int
    block_ids: list[int]
    samples: bool  # this step reaches the request's last token, so the model samples one more


@dataclass(slots=True)
class SchedulerOutput:
    # Single-token entries (decodes) first, then prefill chunks: attention relies on this order.
    scheduled: list[ScheduledRequest]
    num_batched_tokens: int
    # Requests that ended or were preempted since the last step: the runner drops their state.
    finished_request_ids: set[str] = field(default_factory=set)
    preempted_request_ids: set[str] = field(default_factory=set)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass(slots=True)
class SampledToken:
    token_id: int
    logprob: float | None = None
    rank: int | None = None  # 1 = the most likely token
    top_token_ids: list[int] | None = None
    top_logprobs: list[float] | None = None


@dataclass(slots=True)
class ModelRunnerOutput:
    # request_id -> the token sampled for it this step (only requests that sampled)
    sampled: dict[str, SampledToken]
