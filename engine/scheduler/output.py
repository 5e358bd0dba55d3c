"""The typed messages between scheduler and runner.

The runner gets plain data, as in vLLM V1: a request's tokens and sampling settings once, in
`NewRequestData`, when it starts running (and again when it restarts after a preemption); after
that only counts and block ids.  The runner keeps its own copy of each running request's tokens,
appending what it samples, so it never reads (or could change) the scheduler's live `Request`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.elastic.spec import FULL_LEVEL
from engine.prompt_pruning import PrunePlan
from engine.request import Request
from engine.sampling_params import SamplingParams


@dataclass(frozen=True, slots=True)
class NewRequestData:
    """What the runner keeps of a request from the step it starts (or restarts) running."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    output_token_ids: tuple[int, ...]  # non-empty when it restarts after a preemption
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int]
    # Score the prompt tokens as they are computed (Request.needs_prompt_logprobs at (re)start).
    needs_prompt_logprobs: bool = False
    prune_plan: PrunePlan | None = None
    # Known after a preemption, per stage: the runner runs these again rather than scoring anew.
    kept_prompt_positions: tuple[tuple[int, ...], ...] | None = None

    @classmethod
    def of(cls, request: Request) -> NewRequestData:
        return cls(request.request_id, tuple(request.prompt_token_ids), tuple(request.output_token_ids),
                   request.sampling_params, request.eos_token_ids, request.needs_prompt_logprobs,
                   request.prune_plan, request.kept_prompt_positions)


@dataclass(slots=True)
class ScheduledRequest:
    """Run tokens [num_computed_tokens, num_computed_tokens + num_scheduled_tokens) of the request
    this step; if that reaches the request's last token, sample the next one.

    `request` is the scheduler's live object, for the policies and the engine; the runner reads
    only the plain fields (request_id, counts, block_ids, samples, new_request).
    """

    request: Request
    num_computed_tokens: int
    num_scheduled_tokens: int
    block_ids: list[int]
    samples: bool  # this step reaches the request's last token, so the model samples one more
    # Set on the step a request starts or restarts running: the runner holds no state for it yet.
    new_request: NewRequestData | None = None
    # The elastic submodel this step runs the request's tokens at, chosen by the scheduler.  K and
    # V heads are never pruned, so a request may run at another level next step.
    elastic_level: int = FULL_LEVEL
    # The deep KV groups (layers from each prune layer, engine/kv/kv_cache_groups.py), one entry
    # per stage (none on an engine with one group, whose deep layers use block_ids): each block
    # table and tokens, computed before this step and run this step.  Unpruned: group 0's counts.
    kept_block_ids: list[list[int]] = field(default_factory=list)
    num_kept_computed_tokens: tuple[int, ...] = ()
    num_kept_scheduled_tokens: tuple[int, ...] = ()
    request_id: str = field(init=False)

    def __post_init__(self) -> None:
        self.request_id = self.request.request_id


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
    logits_finite: bool = True  # False: the row's logits held NaN or inf (the token is meaningless)


@dataclass(slots=True)
class PromptLogprobsLists:
    """How the model scored a prompt's tokens 1 .. P-1 (token 0 has nothing before it): entry j
    is prompt token j + 1's logprob and rank, and the top tokens at that position."""

    logprobs: list[float]
    ranks: list[int]  # 1 = the most likely token
    top_token_ids: list[list[int]]
    top_logprobs: list[list[float]]


@dataclass(slots=True)
class ModelRunnerOutput:
    # request_id -> the token sampled for it this step (only requests that sampled)
    sampled: dict[str, SampledToken]
    # request_id -> its whole prompt's logprobs, sent once, in the step of its first sampled token
    prompt_logprobs: dict[str, PromptLogprobsLists] = field(default_factory=dict)
    # request_id -> the prompt positions its stage-B step kept at each prune layer (only requests
    # scored this step)
    kept_prompt_positions: dict[str, tuple[tuple[int, ...], ...]] = field(default_factory=dict)
