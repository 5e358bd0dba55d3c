"""One sample being generated: its tokens, how many of them have KV computed, and its status.

Token ranges of a request (the scheduler's whole view of progress):

    all_token_ids:  | prompt ............ | output ....... |
                    0        num_computed_tokens          num_tokens
                    |<- KV in cache ->|<- still to compute ->|

A step schedules some of the tokens still to compute.  When a step reaches num_tokens the model
samples one more token, which is appended (so num_tokens grows by one).  Chunked prefill, decode
and recompute after preemption (num_computed_tokens reset to 0) are all this one rule.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from engine.elastic.spec import FULL_LEVEL
from engine.outputs import RequestMetrics
from engine.prompt_pruning import PrunePlan
from engine.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # waiting again, its KV freed; it will be recomputed
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"  # processing this request failed; the engine went on (LLMEngine._fail)

    @property
    def is_finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
                        RequestStatus.FINISHED_ABORTED, RequestStatus.FINISHED_ERROR)


@dataclass(frozen=True, slots=True)
class SLOTarget:
    """A request's latency targets in seconds (None = no target)."""

    ttft_s: float | None = None
    tpot_s: float | None = None

    @classmethod
    def resolve(cls, own: SLOTarget | None, default_ttft_ms: float | None,
                default_tpot_ms: float | None) -> SLOTarget | None:
        """A request's targets with missing ones taken from the defaults; None if it has none."""
        own = own or cls()
        ttft_s = own.ttft_s if own.ttft_s is not None else _ms_to_s(default_ttft_ms)
        tpot_s = own.tpot_s if own.tpot_s is not None else _ms_to_s(default_tpot_ms)
        return None if ttft_s is None and tpot_s is None else cls(ttft_s, tpot_s)

    def attained(self, ttft_s: float | None, tpot_s: float | None) -> bool:
        """Whether measured latencies meet every target (a missing measurement meets nothing)."""
        if self.ttft_s is not None and (ttft_s is None or ttft_s > self.ttft_s):
            return False
        return self.tpot_s is None or tpot_s is None or tpot_s <= self.tpot_s


def _ms_to_s(ms: float | None) -> float | None:
    return None if ms is None else ms / 1000


@dataclass(slots=True, eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    max_tokens: int  # resolved: never past the context window
    eos_token_ids: frozenset[int] = frozenset()
    arrival_time: float = 0.0
    priority: int = 0  # smaller first (the priority policy); ties by arrival
    slo: SLOTarget | None = None
    best_effort: bool = False  # the SLO policy found its TTFT target out of reach and serves it last
    # The elastic submodel it runs (engine/elastic/spec.py); FULL_LEVEL on a model that is not elastic.
    elastic_level: int = FULL_LEVEL
    # Which prompt tokens the deep layers skip (engine/prompt_pruning.py); None: not pruned.
    prune_plan: PrunePlan | None = None
    prompt_keep: float = 1.0  # the prompt_keep its prune plan was made for (1.0: whole)
    # Settings left to the server (issue #15, engine/scheduler/elastic_choice.py): the SLO policy
    # sets elastic_level each step and picks prompt_keep (one of keep_options' plans) on arrival,
    # never below the floors.
    elastic_auto: bool = False
    min_level: int | None = None
    keep_options: dict[float, PrunePlan | None] | None = None  # prompt_keep -> its plan; None: fixed keep
    min_prompt_keep: float | None = None
    # The prompt positions the runner kept at each prune layer, once it has scored the prompt: a
    # recompute after a preemption runs exactly these again instead of scoring anew.
    kept_prompt_positions: tuple[tuple[int, ...], ...] | None = None
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    all_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    stop_reason: int | str | None = None
    metrics: RequestMetrics | None = None

    def __post_init__(self) -> None:
        self.all_token_ids = list(self.prompt_token_ids)
        if self.metrics is None:
            self.metrics = RequestMetrics(arrival_time=self.arrival_time)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens_to_compute(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def num_prompt_tokens_computed_in_full(self) -> int:
        """Prompt tokens that ran every layer (all of them, unless pruned)."""
        plan = self.prune_plan
        return self.num_prompt_tokens if plan is None else plan.num_kept_prompt_tokens

    @property
    def kv_cache_salt(self) -> bytes:
        """What besides its tokens the request's KV depends on, for the prefix cache's keys: KV
        written by one elastic level is never reused by another.  An auto request's level moves
        between steps, so its blocks mix levels: they are salted apart from every fixed level's,
        and serve only other auto requests."""
        if self.elastic_auto:
            return b"elastic-level=auto"
        return b"" if self.elastic_level == FULL_LEVEL else f"elastic-level={self.elastic_level}".encode()

    def choose_prompt_keep(self, keep: float) -> None:
        """Fix an auto request's prompt_keep (before any of its KV is allocated)."""
        assert self.keep_options is not None and self.num_computed_tokens == 0
        self.prompt_keep, self.prune_plan = keep, self.keep_options[keep]

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Whether computing this request's prompt must also score it: asked for, and not yet
        delivered.  They go out with the first sampled token, so a request recomputed after a
        preemption that came after that token does not score its prompt again."""
        return self.sampling_params.prompt_logprobs is not None and not self.output_token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.status.value if self.status.is_finished else None

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def check_stop(self, max_model_len: int) -> RequestStatus | None:
        """Whether the newest token ends this request (stop strings are checked by the engine,
        which sees text)."""
        params = self.sampling_params
        last = self.output_token_ids[-1]
        if self.num_output_tokens >= params.min_tokens:
            if not params.ignore_eos and last in self.eos_token_ids:
                self.stop_reason = None
                return RequestStatus.FINISHED_STOPPED
            if params.stop_token_ids and last in params.stop_token_ids:
                self.stop_reason = last
                return RequestStatus.FINISHED_STOPPED
        if self.num_output_tokens >= self.max_tokens or self.num_tokens >= max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None
