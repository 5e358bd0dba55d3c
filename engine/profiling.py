"""Measure what engine steps cost, to fit the step cost model (engine/scheduler/cost_model.py).

Two sources of samples:
  - `profile_step_costs`: synthetic steps run through the engine's model runner, chosen to span
    the features (prefill chunks of several sizes and contexts, decode batches of several sizes
    and contexts, mixed steps).  The KV a step reads need not hold real keys for its timing, so a
    decode "with 1,024 tokens of context" costs one decode step, not a 1,024-token prefill first:
    the profile takes about 8 s on two cores (SmolLM2, 512 tokens a step).  Timing covers
    `runner.execute` only, as LLMEngine.step's own observations do; scheduling and output
    processing add about 0.2 ms to a 20-30 ms decode step here.  Synthetic batches are made to
    look like real ones (ragged contexts, KV blocks scattered over the pool), yet real traffic
    differs in ways no fixed set of steps covers: online refinement (`observe`) closes the gap.
  - `timed_step`: one real `engine.step()`, timed, with the features of what it ran.

    engine = LLM(...).engine
    model = StepCostModel.fit(profile_step_costs(engine))
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from engine.elastic.spec import FULL_LEVEL
from engine.request import Request
from engine.scheduler.knob_costs import KnobCosts, rest_of_prefill
from engine.sampling_params import SamplingParams
from engine.scheduler.cost_model import StepFeatures, StepSample, features_of_chunks
from engine.scheduler.output import NewRequestData, ScheduledRequest, SchedulerOutput

if TYPE_CHECKING:
    from engine.kv.kv_cache_groups import KVCacheGroups
    from engine.outputs import RequestOutput
    from engine.scheduler.output import ModelRunnerOutput
    from engine.scheduler.scheduler import Scheduler

# Any in-vocabulary id does: the cost of a step does not depend on which tokens it reads.
PROFILE_TOKEN_ID = 1


class StepRunner(Protocol):
    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput: ...


class ProfiledEngine(Protocol):
    """The parts of an engine profiling uses.  LLMEngine is one; it is described here rather
    than imported because LLMEngine itself profiles at start-up, through this module."""

    @property
    def kv(self) -> KVCacheGroups: ...

    @property
    def scheduler(self) -> Scheduler: ...

    @property
    def runner(self) -> StepRunner: ...

    @property
    def max_model_len(self) -> int: ...

    def has_unfinished_requests(self) -> bool: ...

    def step(self) -> list[RequestOutput]: ...


@dataclass(frozen=True, slots=True)
class ProfileChunk:
    """One request of a synthetic step: tokens [num_computed_tokens, + num_scheduled_tokens)."""

    num_computed_tokens: int
    num_scheduled_tokens: int
    samples: bool = True


@dataclass(frozen=True, slots=True)
class ProfileStep:
    name: str
    chunks: tuple[ProfileChunk, ...]

    @property
    def features(self) -> StepFeatures:
        return features_of_chunks((c.num_computed_tokens, c.num_scheduled_tokens, c.samples) for c in self.chunks)

    @property
    def max_position(self) -> int:
        return max(c.num_computed_tokens + c.num_scheduled_tokens for c in self.chunks)


def prefill(num_tokens: int, context: int = 0, samples: bool = True) -> ProfileChunk:
    return ProfileChunk(context, num_tokens, samples)


def decodes(num_seqs: int, context: int) -> tuple[ProfileChunk, ...]:
    return tuple(ProfileChunk(context, 1) for _ in range(num_seqs))


def ragged_decodes(num_seqs: int, context: int) -> tuple[ProfileChunk, ...]:
    """Decodes with contexts spread evenly in log scale over [context / 8, 2 * context], as real
    batches are (ShareGPT contexts run from tens to thousands of tokens).  Raggedness costs time
    of its own: the CPU attention groups decodes of similar length, one kernel call per group, so
    a batch of equal contexts would time real batches of its size some 10-30% short."""
    if num_seqs == 1:
        return (ProfileChunk(context, 1),)
    return tuple(ProfileChunk(int(context * 2 ** (-3 + 4 * i / (num_seqs - 1))), 1) for i in range(num_seqs))


def default_profile_steps(max_num_batched_tokens: int, max_num_seqs: int) -> list[ProfileStep]:
    """Steps that span what the scheduler produces under this budget and seat limit: each feature
    varies on its own somewhere, so the fit can tell them apart."""
    t, s = max_num_batched_tokens, max_num_seqs
    quarter = max(2, t // 4)
    steps = [ProfileStep(f"prefill {n}", (prefill(n),)) for n in sorted({max(2, t // 16), quarter, max(2, t // 2), t})]
    steps += [  # the same tokens at growing context (attention), in more pieces (per-chunk cost)
        ProfileStep(f"prefill chunk {quarter} at {t}", (prefill(quarter, t, samples=False),)),
        ProfileStep(f"prefill chunk {quarter} at {3 * t}", (prefill(quarter, 3 * t, samples=False),)),
        ProfileStep(f"4 prefills of {quarter}", tuple(prefill(quarter) for _ in range(min(4, s)))),
        ProfileStep("16 short prefills", tuple(prefill(max(2, t // 16)) for _ in range(min(16, s)))),
    ]
    for num_seqs in sorted({1, min(2, s), min(8, s), min(32, s), min(64, s)}):
        for context in (128, 1024):
            steps.append(ProfileStep(f"decode {num_seqs} x ~{context}", ragged_decodes(num_seqs, context)))
    num_mixed = min(16, s - 1)
    if num_mixed >= 1 and t > num_mixed + 1:
        steps.append(ProfileStep(f"mixed {num_mixed} decodes + prefill",
                                 (*ragged_decodes(num_mixed, 512), prefill(t - num_mixed))))
        steps.append(ProfileStep(f"mixed {num_mixed} decodes + chunk",
                                 (*ragged_decodes(num_mixed, 256), prefill(max(2, t // 2), t // 2, samples=False))))
        # Small chunks beside decodes, as the SLO policy fits them into a TPOT budget: steps the
        # model runner may run each layer of in one call (cost_model.OneCallSteps).
        steps.append(ProfileStep(f"mixed {num_mixed} decodes + 8 tokens",
                                 (*ragged_decodes(num_mixed, 256), prefill(8, 128, samples=False))))
        steps.append(ProfileStep(f"mixed {num_mixed} decodes + 2-token prompt",
                                 (*ragged_decodes(num_mixed, 256), prefill(2))))
        # A chunk's tokens in such a step are rows like the decodes' (per_one_call_prefill_token_s).
        steps.append(ProfileStep(f"mixed {num_mixed} decodes + 16 tokens",
                                 (*ragged_decodes(num_mixed, 256), prefill(16, 256, samples=False))))
        # ... and deep in a long prompt, where they attend in the decode kernel (per_one_call_prefill_pair_s).
        steps.append(ProfileStep(f"mixed {num_mixed} decodes + 16 tokens at 1024",
                                 (*ragged_decodes(num_mixed, 256), prefill(16, 1024, samples=False))))
        steps.append(ProfileStep("16 tokens at 256", (prefill(16, 256, samples=False),)))
    return steps


def profile_step_costs(engine: ProfiledEngine, steps: Sequence[ProfileStep] | None = None, *,
                       num_repeats: int = 2) -> list[StepSample]:
    """Run each synthetic step `num_repeats` times through the engine's model runner and return
    one sample per step: its fastest run (contention from other processes only ever adds time).
    The engine must be idle; its KV is empty afterwards.  Steps that need more KV blocks (half
    the pool is theirs) or positions than the engine has are skipped."""
    if engine.has_unfinished_requests():
        raise RuntimeError("profile_step_costs needs an idle engine: its requests would share the KV cache")
    if steps is None:
        steps = default_profile_steps(engine.scheduler.max_num_batched_tokens, engine.scheduler.max_num_seqs)
    with _scattered_free_blocks(engine.kv):
        runnable = [step for step in steps if _fits(engine, step)]
        if runnable:  # the very first large step pays one-time set-up: keep it out of the samples
            time_profile_step(engine, max(runnable, key=lambda step: step.features.num_scheduled_tokens))
        return [StepSample(step.features, min(time_profile_step(engine, step) for _ in range(num_repeats)))
                for step in runnable]


def profile_level_costs(engine: ProfiledEngine, levels: Sequence[int], prune_stage_shares: Sequence[float] = (),
                        attention_fraction: Mapping[int, float] | None = None,
                        attention_share_of: Callable[[StepFeatures], float] | None = None,
                        *, num_rounds: int = 5) -> KnobCosts:
    """Each elastic level's decode and prefill step time over the full level's
    (engine/scheduler/knob_costs.py): a decode step of up to 32 rows at ~256 tokens of context and
    a prefill chunk of up to 256 tokens, each run at every level in turn, `num_rounds` times; a
    level's fraction is the median over rounds of its time over the full level's in the same
    round.  Why rounds: this VM's speed moves by 10-15% between steps, and the fastest of two
    steps a level, levels one after another, put level 70's decode at 0.80-1.00 of the full
    level's across four profiles (0.93 in steady decode, benchmarks/README.md);
    a policy admitting against 0.80 over-admits.  A few seconds for SmolLM2's six levels here.
    The engine must be idle.
    `attention_fraction` (level -> the share of the full model's prefill attention it computes)
    and `attention_share_of` (the cost model's attention share of a step) make the prefill
    fraction that of the rest of the prefill: the chunk's attention share taken out."""
    seats, budget = engine.scheduler.max_num_seqs, engine.scheduler.max_num_batched_tokens
    steps = {True: ProfileStep("decode", ragged_decodes(min(32, seats), 256)),
             False: ProfileStep("prefill", (prefill(min(256, budget)),))}
    fractions: dict[bool, dict[int, float]] = {True: {}, False: {}}
    with _scattered_free_blocks(engine.kv):
        for is_decode, step in steps.items():
            if not _fits(engine, step):
                fractions[is_decode] = {level: 1.0 for level in levels}
                continue
            time_profile_step(engine, step)  # warm-up
            ratios: dict[int, list[float]] = {level: [] for level in levels}
            for _ in range(num_rounds):
                times = {level: time_profile_step(engine, step, level) for level in levels}
                for level in levels:
                    ratios[level].append(times[level] / times[levels[0]])
            fractions[is_decode] = {level: min(statistics.median(ratios[level]), 2.0) for level in levels}
    attention = dict(attention_fraction or {})
    if attention and attention_share_of is not None:
        share = attention_share_of(steps[False].features)
        fractions[False] = {level: rest_of_prefill(f, attention.get(level, f), share)
                            for level, f in fractions[False].items()}
    return KnobCosts(tuple(levels), fractions[True], fractions[False], tuple(prune_stage_shares), attention)


@contextmanager
def _scattered_free_blocks(kv: KVCacheGroups, seed: int = 0) -> Iterator[None]:
    """Make the next allocations draw blocks scattered over the whole pool, as they are once real
    requests have come and gone: hold every free block, then free a random half in random order.
    A fresh pool hands out consecutive blocks, and reading K/V from consecutive blocks is faster
    (64 decodes at ~512 tokens of context: 102 ms a step, 123 ms from scattered blocks)."""
    filler_ids = [f"profile-filler-{i}" for i in range(kv.num_free_blocks)]
    for filler_id in filler_ids:
        kv.allocate_slots(filler_id, 1)
    random.Random(seed).shuffle(filler_ids)
    for filler_id in filler_ids[: len(filler_ids) // 2]:
        kv.free(filler_id)
    try:
        yield
    finally:
        for filler_id in filler_ids[len(filler_ids) // 2:]:
            kv.free(filler_id)


def _fits(engine: ProfiledEngine, step: ProfileStep) -> bool:
    block_size = engine.kv.block_size
    blocks = sum(-(-(c.num_computed_tokens + c.num_scheduled_tokens) // block_size) for c in step.chunks)
    return blocks <= engine.kv.num_free_blocks and step.max_position <= engine.max_model_len


def time_profile_step(engine: ProfiledEngine, step: ProfileStep, level: int = FULL_LEVEL) -> float:
    """Seconds `runner.execute` takes on this step (every row at elastic `level`); the step's KV
    blocks are freed after."""
    scheduled = []
    try:
        for i, chunk in enumerate(step.chunks):
            scheduled.append(_scheduled_chunk(engine, f"profile-{i}", chunk, level))
        scheduled.sort(key=lambda s: s.num_scheduled_tokens != 1)  # decodes first, as the runner expects
        output = SchedulerOutput(scheduled=scheduled, num_batched_tokens=step.features.num_scheduled_tokens)
        start = time.perf_counter()
        engine.runner.execute(output)
        return time.perf_counter() - start
    finally:
        for item in scheduled:
            engine.kv.free(item.request.request_id)


def _scheduled_chunk(engine: ProfiledEngine, request_id: str, chunk: ProfileChunk,
                     level: int = FULL_LEVEL) -> ScheduledRequest:
    end = chunk.num_computed_tokens + chunk.num_scheduled_tokens
    # A chunk that does not sample stops short of the request's last token.
    num_tokens = end if chunk.samples else end + 1
    request = Request(request_id=request_id, prompt_token_ids=[PROFILE_TOKEN_ID] * num_tokens,
                      sampling_params=SamplingParams(temperature=0.0, max_tokens=1), max_tokens=1)
    request.num_computed_tokens = chunk.num_computed_tokens
    if not engine.kv.allocate_slots(request_id, end):
        raise RuntimeError(f"no KV blocks for profile request {request_id} ({end} tokens)")
    # Each profiled step is the runner's first sight of its requests (ids repeat across steps).
    return ScheduledRequest(request=request, num_computed_tokens=chunk.num_computed_tokens,
                            num_scheduled_tokens=chunk.num_scheduled_tokens,
                            block_ids=engine.kv.block_table(request_id), samples=chunk.samples,
                            elastic_level=level,
                            new_request=NewRequestData.of(request),
                            kept_block_ids=engine.kv.kept_block_tables(request_id),
                            num_kept_computed_tokens=(chunk.num_computed_tokens,) * engine.kv.num_stages,
                            num_kept_scheduled_tokens=(chunk.num_scheduled_tokens,) * engine.kv.num_stages)


# ---- real steps ------------------------------------------------------------------------------

def timed_step(engine: ProfiledEngine) -> tuple[list[RequestOutput], StepSample | None]:
    """`engine.step()`, timed, with the features of what it ran (None for an empty step).

    The features are read from the requests' progress: a request whose num_computed_tokens went
    from c to c + n ran a chunk of n tokens at context c, and sampled if it gained an output token.
    (A request preempted and readmitted within one step would be misread; preemption needs a full
    KV cache.)  LLMEngine.step itself feeds its cost model features_of(scheduler_output) and the
    runner's time; this is for callers that time whole steps of any engine (benchmarks).
    """
    before = [(r, r.num_computed_tokens, r.num_output_tokens) for r in engine.scheduler.requests.values()]
    start = time.perf_counter()
    outputs = engine.step()
    elapsed_s = time.perf_counter() - start
    chunks = [(c, r.num_computed_tokens - c, r.num_output_tokens > o) for r, c, o in before
              if r.num_computed_tokens > c]
    if not chunks:
        return outputs, None
    return outputs, StepSample(features_of_chunks(chunks), elapsed_s)


class StepRecorder:
    """Collects (features, seconds) of steps: anything with `observe` can watch the engine's steps,
    a StepCostModel to refine itself, or this to keep them (for a fit, or to compare with a model)."""

    def __init__(self) -> None:
        self.samples: list[StepSample] = []

    def observe(self, features: StepFeatures, elapsed_s: float) -> None:
        if not features.is_empty:
            self.samples.append(StepSample(features, elapsed_s))
