"""`engine bench simulate`: serve a trace with the real scheduler on a virtual clock, no model.

Each replica is the engine's own Scheduler, KVCacheManager and policy; only the model runner is
replaced.  A step's duration is the step cost model's prediction for what the scheduler chose
(engine/scheduler/cost_model.py), and every request that samples gets a fake token.  Requests
ignore EOS and stop at their expected output length, as `engine bench serve --ignore-eos` asks.

Events, in time order (an arrival at the same instant as a step's end goes first, as in the
engine's loop, which adds what has arrived and then steps):

    arrival      the dispatcher picks a replica (least outstanding requests, or round robin);
                 the request waits there until the replica's next schedule()
    step start   schedule() at the replica's clock; the step ends predict_s(features) later
    step end     update_from_output(): tokens are stamped with the end time, requests finish

An idle replica skips ahead to its next arrival.  The result is the records `engine bench serve`
makes, summarized by engine/bench/metrics.py, so simulated and measured runs read alike.

Built-in cost profiles (`--cost-profile`), and where their numbers come from:
    smollm2-cpu       SmolLM2-135M-Instruct, bf16, on the 2-vCPU development machine
                      (benchmarks/README.md) at max_num_batched_tokens 512: fitted on the real steps
                      of benchmarks/simulator_validation.py
    llama-70b-a100x4  a roofline estimate of Llama-2-70B, bf16, tensor parallel over 4 A100-80GB
                      SXM (see LLAMA_70B_A100X4 below for the arithmetic)
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from engine.bench.arrivals import arrival_times
from engine.bench.metrics import RequestRecord, summarize
from engine.bench.workload import DATASETS, load_tokenizer, sample_requests
from engine.config import PromptPruningConfig, SchedulerConfig, SLOConfig
from engine.kv.kv_cache_manager import KVCacheManager
from engine.request import Request, RequestStatus, SLOTarget
from engine.sampling_params import SamplingParams
from engine.elastic.quality_table import DEFAULT_QUALITY, QualityTable
from engine.scheduler.cost_model import CostCoefficients, StepCostModel, StepFeatures, features_of, features_of_chunks
from engine.scheduler.elastic_choice import AUTO, ElasticChoice, allowed_keeps
from engine.scheduler.knob_costs import KnobCosts, StepLevels
from engine.scheduler.output import ModelRunnerOutput, SampledToken, ScheduledRequest, SchedulerOutput
from engine.scheduler.policy import AdmissionRejected
from engine.scheduler.policy_factory import make_policy
from engine.scheduler.scheduler import Scheduler

# The token every simulated step samples: its value never matters, requests ignore EOS.
FAKE_TOKEN = SampledToken(token_id=1)
# Prompt ids of requests that bring none: random ids in this range, distinct per request, so no
# two prompts share a prefix (ShareGPT questions rarely do).
FAKE_VOCAB = (1000, 30000)
DISPATCH_POLICIES = ("least-outstanding", "round-robin")


# ---- built-in cost profiles ------------------------------------------------------------------

@dataclass(frozen=True)
class CostProfile:
    """A step cost model with the serving settings it describes (the simulator's defaults)."""

    description: str
    coefficients: CostCoefficients
    num_kv_blocks: int
    block_size: int = 16
    max_num_batched_tokens: int = 512
    max_num_seqs: int = 128
    max_model_len: int = 8192
    tensor_parallel_size: int = 1  # accelerators one replica of this profile uses

    def cost_model(self) -> StepCostModel:
        return StepCostModel(self.coefficients, description=self.description)


SMOLLM2_CPU = CostProfile(
    description="SmolLM2-135M-Instruct bf16 on 2 vCPUs (AVX-512), fitted on real ShareGPT steps at 512 tokens/step",
    # StepCostModel.fit on the 1,382 uncontended steps that the real engine ran serving
    # benchmarks/simulator_validation.py's measured trace (2026-11-24; "real_steps" in its JSON).
    coefficients=CostCoefficients(overhead_s=0.0158, per_scheduled_token_s=3.2e-4, per_prefill_seq_s=4.5e-3,
                                  per_sampled_seq_s=5.2e-4, per_decode_context_token_s=4.1e-6,
                                  per_prefill_attention_pair_s=5.6e-7),
    num_kv_blocks=5825,  # what 2 GiB of bf16 KV holds for SmolLM2 (30 layers, 3 KV heads of 64)
)

# Llama-2-70B (80 layers, hidden 8192, 64 query / 8 KV heads of 128, 70e9 parameters), bf16, TP=4
# on A100-80GB SXM (2.0 TB/s HBM, 312 TFLOP/s bf16 dense, NVLink), one step = one forward pass:
#   overhead        every step reads all weights: 141 GB / 4 GPUs / (2.0 TB/s * 0.8 achieved)
#                   = 22 ms, plus 160 all-reduces (2 per layer) at ~15 us = 2.4 ms  -> 25 ms
#   per token       2 * 70e9 FLOP / (4 * 312e12 * 0.6 MFU) = 0.19 ms, plus all-reduce volume
#                   (16 KB per token, 160 times, ring over 4) at ~250 GB/s = 0.01 ms  -> 0.2 ms
#                   (the linear sum overstates steps near the compute/memory crossover, about
#                   100-150 tokens, by at most the 22 ms floor: a roofline takes the max)
#   per sampled seq the LM head row is in the per-token FLOPs already; ~40 us of CPU-side sampling,
#                   detokenization and output building per sequence (vLLM-like serving loop)
#   decode context  K and V of one token: 80 layers * 8 heads * 128 * 2 * 2 B = 320 KB, 80 KB per
#                   GPU, read at 1.6 TB/s -> 50 ns per context token
#   prefill pairs   4 * 128 * 64 heads * 80 layers = 2.6 MFLOP per (query, key) pair, per GPU at
#                   50% of peak (flash attention) -> 4.2 ns per causal pair; the feature counts
#                   n * (c + n) pairs, twice the causal n^2 / 2 of a fresh prompt, so 3 ns per counted
#                   pair is within 1.4x of both a fresh prompt and a late chunk of a long one
#   KV blocks       4 * 80 GB * 0.9 - 141 GB weights = 147 GB of KV / 320 KB = 460k tokens
LLAMA_70B_A100X4 = CostProfile(
    description="Llama-2-70B bf16, TP=4 on A100-80GB SXM: roofline estimate (engine/bench/simulate.py)",
    coefficients=CostCoefficients(overhead_s=0.025, per_scheduled_token_s=2.0e-4, per_prefill_seq_s=0.0,
                                  per_sampled_seq_s=4.0e-5, per_decode_context_token_s=5.0e-8,
                                  per_prefill_attention_pair_s=3.0e-9),
    num_kv_blocks=28_700, max_num_batched_tokens=2048, max_num_seqs=256, max_model_len=4096,
)

COST_PROFILES: dict[str, CostProfile] = {"smollm2-cpu": SMOLLM2_CPU, "llama-70b-a100x4": LLAMA_70B_A100X4}


# ---- the simulation --------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class SimRequest:
    """One request of a trace.  Without prompt_token_ids it gets random ids of its own."""

    prompt_len: int
    output_len: int
    arrival_time_s: float = 0.0
    prompt_token_ids: tuple[int, ...] | None = None
    priority: int = 0  # the request field the priority policy orders by
    slo: SLOTarget | None = None  # its own targets (None: SimConfig's)
    # Elastic settings, as LLMEngine.add_request takes them: a level or "auto", a prompt_keep or
    # "auto", and the floors of "auto".  They cost what SimConfig.knob_costs says (issue #15).
    elastic_level: int | str = 100
    prompt_keep: float | str = 1.0
    min_level: int | None = None
    min_prompt_keep: float | None = None


@dataclass(frozen=True)
class SimConfig:
    """What is simulated: each replica's scheduler settings, and how many replicas share the load."""

    policy: str = "fcfs"
    max_num_batched_tokens: int = 512
    max_num_seqs: int = 128
    num_kv_blocks: int = 5825
    block_size: int = 16
    max_model_len: int = 8192
    enable_prefix_caching: bool = True
    num_replicas: int = 1
    dispatch: str = "least-outstanding"  # or "round-robin"
    slo_ttft_ms: float | None = None  # every request's targets (the slo policy schedules by them)
    slo_tpot_ms: float | None = None
    # What the slo policy does with a request whose target it cannot meet: refuse it (the default,
    # as the server's), or serve it last (`--slo-best-effort`): the same trace then keeps its work.
    slo_best_effort: bool = False
    seed: int = 0  # of the random prompt ids
    # What elastic levels and pruned prompts save (engine/scheduler/knob_costs.py, as the engine
    # profiled them); None: every setting costs the full model's step.
    knob_costs: KnobCosts | None = None
    # How good each setting is, as the engine's SLO policy ranks them (its checkpoint's table).
    quality: QualityTable = DEFAULT_QUALITY
    # Prompts shorter than this are never pruned: their prompt_keep is 1 whatever they ask (the
    # engine's PromptPruningConfig.min_prompt_tokens).
    min_pruned_prompt_tokens: int = PromptPruningConfig.min_prompt_tokens

    def __post_init__(self) -> None:
        if self.num_replicas < 1:
            raise ValueError(f"num_replicas must be positive, got {self.num_replicas}")
        if self.dispatch not in DISPATCH_POLICIES:
            raise ValueError(f"dispatch must be one of {DISPATCH_POLICIES}, got {self.dispatch!r}")
        if self.num_kv_blocks < 1 or self.block_size < 1:
            raise ValueError(f"num_kv_blocks and block_size must be positive, got {self.num_kv_blocks}, "
                             f"{self.block_size}")

    @property
    def kv_capacity_tokens(self) -> int:
        return self.num_kv_blocks * self.block_size

    def scheduler_config(self) -> SchedulerConfig:
        return SchedulerConfig(max_num_batched_tokens=self.max_num_batched_tokens, max_num_seqs=self.max_num_seqs,
                               policy=self.policy, max_model_len=self.max_model_len,
                               slo=SLOConfig(ttft_ms=self.slo_ttft_ms, tpot_ms=self.slo_tpot_ms,
                                             best_effort=self.slo_best_effort))

    def slo_target(self) -> SLOTarget | None:
        if self.slo_ttft_ms is None and self.slo_tpot_ms is None:
            return None
        return SLOTarget(ttft_s=_seconds(self.slo_ttft_ms), tpot_s=_seconds(self.slo_tpot_ms))


def _seconds(ms: float | None) -> float | None:
    return None if ms is None else ms / 1000.0


@dataclass
class SimResult:
    records: list[RequestRecord]  # in trace order
    duration_s: float  # virtual seconds from the trace's start to the last token
    num_steps: int
    num_preemptions: int
    wall_s: float  # real seconds the simulation took

    def summary(self, slo_ttft_ms: float | None = None, slo_tpot_ms: float | None = None) -> dict[str, Any]:
        return summarize(self.records, self.duration_s, slo_ttft_ms, slo_tpot_ms)


@dataclass(slots=True)
class _Timeline:
    """What the client would see of one request: when it arrived, each token's time, the end."""

    arrival_s: float
    token_times_s: list[float] = field(default_factory=list)
    token_levels: list[int] = field(default_factory=list)
    prompt_keep: float = 1.0
    finished_s: float | None = None
    error: str | None = None


class Replica:
    """One engine without its model: a Scheduler on a virtual clock, stepped by the cost model."""

    def __init__(self, config: SimConfig, cost_model: StepCostModel) -> None:
        self.now = 0.0
        self.cost_model = cost_model
        kv = KVCacheManager(config.num_kv_blocks, config.block_size,
                            enable_prefix_caching=config.enable_prefix_caching)
        self.knob_costs = None if config.knob_costs is None else copy.deepcopy(config.knob_costs)
        choice = None if self.knob_costs is None else ElasticChoice(self.knob_costs, config.quality)
        self.scheduler = Scheduler(kv, make_policy(config.scheduler_config(), cost_model, choice),
                                   max_num_batched_tokens=config.max_num_batched_tokens,
                                   max_num_seqs=config.max_num_seqs, max_model_len=config.max_model_len,
                                   clock=lambda: self.now)
        self.in_flight: tuple[SchedulerOutput, float] | None = None  # the running step and its end
        self.blocked = False  # its last schedule() ran nothing: wait for an arrival
        self.num_steps = 0

    @property
    def num_outstanding(self) -> int:
        return len(self.scheduler.requests)

    def next_event_s(self) -> float:
        """When this replica next acts: its step's end, now if it has work to start, else never."""
        if self.in_flight is not None:
            return self.in_flight[1]
        if self.blocked or not self.scheduler.has_unfinished_requests():
            return math.inf
        return self.now

    def start_step(self) -> None:
        output = self.scheduler.schedule()
        if output.is_empty:
            self.blocked = True  # nothing can run until something changes: only an arrival can
            return
        self.in_flight = (output, self.now + self.step_s(output))
        self.num_steps += 1

    def step_s(self, output: SchedulerOutput) -> float:
        """The cost model's step time, as the engine has measured steps like it: a step running
        decodes and prefill chunks together takes mixed_step_excess_s longer than the linear
        prediction (an overrun in seconds, not a ratio: see StepCostModel).  Scaled by the knobs:
        a pruned prompt's prefill chunks count their full-model-equivalent tokens, and the step
        is priced at its rows' levels (KnobCosts.priced_s)."""
        features = features_of(output)
        is_mixed = features.num_prefill_seqs and features.num_decode_context_tokens
        excess_s = self.cost_model.mixed_step_excess_s if is_mixed else 0.0
        costs = self.knob_costs
        if costs is None:
            return max(0.0, self.cost_model.predict_s(features) + excess_s)
        chunks = [(s.num_computed_tokens, _pruned_tokens(s, costs), s.samples) for s in output.scheduled]
        levels = StepLevels.of(output.scheduled)
        computed = _with_widest_layers(features_of_chunks(chunks), chunks, output.scheduled)
        full_s = max(0.0, self.cost_model.predict_s(computed) + excess_s)
        if levels.widest not in costs.decode_fraction:
            return full_s
        decodes_s = 0.0 if not levels.is_mixed else self.cost_model.predict_s(
            features_of_chunks(c for c, s in zip(chunks, output.scheduled) if s.num_scheduled_tokens == 1))
        return costs.priced_s(full_s, decodes_s, levels, self.cost_model.attention_share(computed))

    def end_step(self) -> list[Request]:
        output, self.now = self.in_flight
        self.in_flight = None
        sampled = {s.request.request_id: FAKE_TOKEN for s in output.scheduled if s.samples}
        return self.scheduler.update_from_output(output, ModelRunnerOutput(sampled=sampled))


def simulate(trace: Sequence[SimRequest], config: SimConfig, cost_model: StepCostModel, *,
             on_step: Callable[[Replica], None] | None = None) -> SimResult:
    """Serve `trace` on config.num_replicas simulated replicas; `on_step` (e.g. an invariant
    check) is called after every step ends."""
    started = time.perf_counter()
    replicas = [Replica(config, cost_model) for _ in range(config.num_replicas)]
    dispatch = _dispatcher(config.dispatch, replicas)
    timelines = [_Timeline(r.arrival_time_s) for r in trace]
    arrivals = sorted(range(len(trace)), key=lambda i: trace[i].arrival_time_s)
    rng = np.random.default_rng(config.seed)
    next_arrival = 0
    while True:
        arrival_s = trace[arrivals[next_arrival]].arrival_time_s if next_arrival < len(arrivals) else math.inf
        replica = min(replicas, key=Replica.next_event_s)
        event_s = replica.next_event_s()
        if math.isinf(arrival_s) and math.isinf(event_s):
            break
        if arrival_s <= event_s:
            index = arrivals[next_arrival]
            next_arrival += 1
            _arrive(dispatch(), index, trace[index], timelines[index], config, rng, arrival_s)
        elif replica.in_flight is None:
            replica.start_step()
        else:
            for request in replica.end_step():
                _on_token(request, timelines[int(request.request_id)], replica.now)
            if on_step is not None:
                on_step(replica)
    _fail_stranded(replicas, timelines)
    records = [_record(r, t) for r, t in zip(trace, timelines)]
    duration_s = max((t.finished_s for t in timelines if t.finished_s is not None), default=0.0)
    return SimResult(records, duration_s, sum(r.num_steps for r in replicas),
                     sum(r.scheduler.num_preemptions_total for r in replicas), time.perf_counter() - started)


def _dispatcher(name: str, replicas: list[Replica]) -> Callable[[], Replica]:
    if name == "round-robin":
        return itertools.cycle(replicas).__next__
    # Least outstanding requests; ties go to the replica that has gone longest without one.
    last_used = dict.fromkeys(map(id, replicas), 0)
    counter = itertools.count(1)

    def least_outstanding() -> Replica:
        replica = min(replicas, key=lambda r: (r.num_outstanding, last_used[id(r)]))
        last_used[id(replica)] = next(counter)
        return replica
    return least_outstanding


def _arrive(replica: Replica, index: int, spec: SimRequest, timeline: _Timeline, config: SimConfig,
            rng: np.random.Generator, now: float) -> None:
    """Hand a request to a replica at `now` (an idle replica's clock jumps ahead to it)."""
    if replica.in_flight is None:
        replica.now = max(replica.now, now)
    replica.blocked = False
    total = spec.prompt_len + spec.output_len
    if total > min(config.max_model_len, config.kv_capacity_tokens) or spec.prompt_len < 1 or spec.output_len < 1:
        timeline.error = (f"prompt + output ({total} tokens) exceed the model length {config.max_model_len} "
                          f"or the KV capacity {config.kv_capacity_tokens}")
        return
    token_ids = spec.prompt_token_ids or tuple(rng.integers(*FAKE_VOCAB, size=spec.prompt_len).tolist())
    request = Request(request_id=str(index), prompt_token_ids=list(token_ids),
                      sampling_params=SamplingParams(temperature=0.0, max_tokens=spec.output_len, ignore_eos=True),
                      max_tokens=spec.output_len, arrival_time=now, priority=spec.priority,
                      slo=spec.slo or config.slo_target(), **_elastic_fields(spec, config))
    try:
        replica.scheduler.add_request(request)
    except AdmissionRejected as rejection:
        timeline.error = f"rejected: {rejection}"


def _elastic_fields(spec: SimRequest, config: SimConfig) -> dict:
    """Request fields of the spec's elastic settings.  Pruned prompts keep one KV group here (no
    prune plan): only their cost is simulated (Replica.step_s).  A prompt too short to prune
    runs whole, as in the engine (LLMEngine._keep_options)."""
    level_auto, keep_auto = spec.elastic_level == AUTO, spec.prompt_keep == AUTO
    prunable = spec.prompt_len >= config.min_pruned_prompt_tokens
    keeps = allowed_keeps(spec.min_prompt_keep) if prunable else [1.0]
    return {"elastic_level": 100 if level_auto else spec.elastic_level, "elastic_auto": level_auto,
            "min_level": spec.min_level, "min_prompt_keep": spec.min_prompt_keep,
            "prompt_keep": 1.0 if keep_auto or not prunable else spec.prompt_keep,
            "keep_options": dict.fromkeys(keeps) if keep_auto and len(keeps) > 1 else None}


def _pruned_tokens(scheduled: ScheduledRequest, costs: KnobCosts) -> int:
    """A chunk's full-model-equivalent tokens: a pruned prompt's prefill costs keep_fraction."""
    n, keep = scheduled.num_scheduled_tokens, scheduled.request.prompt_keep
    return n if n == 1 or keep >= 1.0 else max(2, round(n * costs.keep_fraction(keep)))


def _with_widest_layers(computed: StepFeatures, chunks: list[tuple[int, int, bool]],
                        scheduled: list[ScheduledRequest]) -> StepFeatures:
    """`computed`, the features of `chunks` (pruned prompts' chunks at their priced tokens), with
    what the shallow layers hold beyond them, every token of each chunk
    (StepFeatures.num_extra_widest_rows), so that the one-call bounds see the runner's rows."""
    if all(priced == s.num_scheduled_tokens for (_, priced, _), s in zip(chunks, scheduled)):
        return computed
    held = features_of_chunks((s.num_computed_tokens, s.num_scheduled_tokens, s.samples) for s in scheduled)
    return replace(computed, num_extra_widest_rows=held.num_scheduled_tokens - computed.num_scheduled_tokens,
                   num_extra_widest_pairs=held.num_prefill_attention_pairs - computed.num_prefill_attention_pairs)


def _on_token(request: Request, timeline: _Timeline, now: float) -> None:
    timeline.token_times_s.append(now)
    timeline.token_levels.append(request.elastic_level)
    timeline.prompt_keep = request.prompt_keep
    if request.is_finished:
        timeline.finished_s = now


def _fail_stranded(replicas: list[Replica], timelines: list[_Timeline]) -> None:
    """Requests no step could ever run (nothing left to arrive and unblock them) fail."""
    for replica in replicas:
        stranded = list(replica.scheduler.requests)
        replica.scheduler.finish_requests(stranded, RequestStatus.FINISHED_ABORTED)
        for request_id in stranded:
            timelines[int(request_id)].error = "never scheduled: the scheduler ran nothing with it waiting"


def _record(spec: SimRequest, timeline: _Timeline) -> RequestRecord:
    times = timeline.token_times_s
    if timeline.error is not None or timeline.finished_s is None:
        return RequestRecord(prompt_len=spec.prompt_len, output_len=len(times), success=False,
                             error=timeline.error or "unfinished", arrival_time_s=timeline.arrival_s,
                             start_time_s=timeline.arrival_s)
    return RequestRecord(prompt_len=spec.prompt_len, output_len=len(times), ttft_s=times[0] - timeline.arrival_s,
                         itl_s=np.diff(times).tolist(), e2el_s=timeline.finished_s - timeline.arrival_s,
                         arrival_time_s=timeline.arrival_s, start_time_s=timeline.arrival_s,
                         token_levels=timeline.token_levels, prompt_keep=timeline.prompt_keep)


def make_trace(prompt_lens: Sequence[int], output_lens: Sequence[int], request_rate: float,
               burstiness: float = 1.0, seed: int = 0,
               prompt_token_ids: Sequence[Sequence[int] | None] | None = None) -> list[SimRequest]:
    """Requests with these lengths arriving as `engine bench serve` would send them."""
    times = arrival_times(len(prompt_lens), request_rate, burstiness, seed)
    token_ids = prompt_token_ids or [None] * len(prompt_lens)
    return [SimRequest(p, o, t, None if ids is None else tuple(ids))
            for p, o, t, ids in zip(prompt_lens, output_lens, times, token_ids)]


# ---- the command -----------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    model = parser.add_argument_group("step cost model (one of)")
    model.add_argument("--cost-profile", default="smollm2-cpu", choices=sorted(COST_PROFILES),
                       help="built-in model; also sets the defaults of the engine flags below")
    model.add_argument("--cost-model", type=Path, default=None, help="a fitted model's JSON (StepCostModel.to_dict)")
    model.add_argument("--fit-cost-model", type=Path, default=None,
                       help="profile the real engine (default model, --max-num-batched-tokens/--max-num-seqs), "
                            "save the fitted model's JSON here, and simulate with it")
    engine = parser.add_argument_group("each replica (default: the cost profile's settings)")
    engine.add_argument("--policy", "--scheduling-policy", dest="policy", default="fcfs")
    engine.add_argument("--max-num-batched-tokens", type=int, default=None)
    engine.add_argument("--max-num-seqs", type=int, default=None)
    engine.add_argument("--num-kv-blocks", type=int, default=None)
    engine.add_argument("--block-size", type=int, default=None)
    engine.add_argument("--max-model-len", type=int, default=None)
    engine.add_argument("--no-prefix-caching", action="store_true")
    engine.add_argument("--num-replicas", type=int, default=1)
    engine.add_argument("--dispatch", default="least-outstanding", choices=DISPATCH_POLICIES)
    data = parser.add_argument_group("dataset (as `engine bench serve`)")
    data.add_argument("--dataset", "--dataset-name", dest="dataset", default="sharegpt", choices=DATASETS)
    data.add_argument("--num-prompts", type=int, default=1000)
    data.add_argument("--max-output-tokens", type=int, default=None, help="cap every request's output length")
    data.add_argument("--sharegpt-output-len", type=int, default=None)
    data.add_argument("--max-prompt-len", type=int, default=1024)
    data.add_argument("--random-input-len", type=int, default=1024)
    data.add_argument("--random-output-len", type=int, default=128)
    data.add_argument("--random-range-ratio", type=float, default=0.0)
    data.add_argument("--long-input-len", type=int, default=4096)
    data.add_argument("--long-output-len", type=int, default=128)
    data.add_argument("--prefix-len", type=int, default=512)
    data.add_argument("--num-prefixes", type=int, default=4)
    data.add_argument("--tokenizer", default=None, help="GGUF file or HF directory (default: the engine's model)")
    data.add_argument("--seed", type=int, default=0, help="of the dataset sample and the arrival process")
    load = parser.add_argument_group("load")
    load.add_argument("--request-rate", type=float, default=math.inf, help="requests/s; inf = all at once")
    load.add_argument("--burstiness", type=float, default=1.0, help="1 = Poisson; gamma shape otherwise")
    load.add_argument("--slo-ttft-ms", type=float, default=None)
    load.add_argument("--slo-tpot-ms", type=float, default=None)
    load.add_argument("--slo-best-effort", action="store_true",
                      help="the slo policy serves requests it cannot serve on target last instead of refusing them "
                           "(as `engine serve --slo-best-effort`)")
    plan = parser.add_argument_group("capacity planning (engine/bench/capacity.py)")
    plan.add_argument("--plan-gpus", type=int, default=None,
                      help="find the fewest accelerators, up to this many, whose replicas meet the SLOs")
    plan.add_argument("--plan-profiles", default=None,
                      help="comma-separated cost profiles to plan with (default: Llama-3-70B on H100 at TP 2, 4, 8)")
    plan.add_argument("--plan-target", type=float, default=0.9, help="SLO attainment the plan must reach")
    out = parser.add_argument_group("output")
    out.add_argument("--label", default=None, help="this run's name in tables and plots")
    out.add_argument("--save-result", type=Path, default=None, help="JSON; the .md table and .png plots go beside it")


def main(args: argparse.Namespace) -> None:
    try:
        _main(args)
    except (ValueError, OSError) as e:
        raise SystemExit(f"engine bench simulate: {e}") from None


def _main(args: argparse.Namespace) -> None:
    from engine.bench.report import format_summary, save_result

    profile = COST_PROFILES[args.cost_profile]
    config = sim_config_from_args(args, profile)
    cost_model = load_cost_model(args, profile, config)
    trace = load_trace(args, config)
    result = simulate(trace, config, cost_model)
    run = run_dict(result, config, cost_model, args)
    print(format_summary(run))
    print(f"simulated {len(trace)} requests, {result.num_steps} steps, {result.num_preemptions} preemptions "
          f"in {result.wall_s:.2f} s of wall time ({cost_model.description or 'cost model'})")
    if args.save_result is not None:
        save_result(args.save_result, [run], sweep=False,
                    extra={"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                                    if k != "handler"}})
        print(f"saved {args.save_result} and its .md and .png beside it")


def sim_config_from_args(args: argparse.Namespace, profile: CostProfile) -> SimConfig:
    def given(value: int | None, default: int) -> int:
        return default if value is None else value

    return SimConfig(policy=args.policy,
                     max_num_batched_tokens=given(args.max_num_batched_tokens, profile.max_num_batched_tokens),
                     max_num_seqs=given(args.max_num_seqs, profile.max_num_seqs),
                     num_kv_blocks=given(args.num_kv_blocks, profile.num_kv_blocks),
                     block_size=given(args.block_size, profile.block_size),
                     max_model_len=given(args.max_model_len, profile.max_model_len),
                     enable_prefix_caching=not args.no_prefix_caching, num_replicas=args.num_replicas,
                     dispatch=args.dispatch, slo_ttft_ms=args.slo_ttft_ms, slo_tpot_ms=args.slo_tpot_ms,
                     slo_best_effort=args.slo_best_effort, seed=args.seed)


def load_cost_model(args: argparse.Namespace, profile: CostProfile, config: SimConfig) -> StepCostModel:
    if args.fit_cost_model is not None:
        return fit_and_save_cost_model(args.fit_cost_model, config)
    if args.cost_model is not None:
        return StepCostModel.from_dict(json.loads(args.cost_model.read_text()))
    return profile.cost_model()


def fit_and_save_cost_model(path: Path, config: SimConfig) -> StepCostModel:
    """Profile the real engine (default model, this config's budget and seats) and save the fit."""
    from engine import LLM
    from engine.profiling import profile_step_costs

    llm = LLM(max_num_batched_tokens=config.max_num_batched_tokens, max_num_seqs=config.max_num_seqs)
    samples = profile_step_costs(llm.engine)
    model = StepCostModel.fit(samples, description=f"profile_step_costs of {llm.engine.model_name} at "
                                                   f"{config.max_num_batched_tokens} tokens/step",
                                  one_call=llm.engine.runner.one_call_steps)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(model.to_dict(), indent=2) + "\n")
    print(f"fitted on {len(samples)} profiled steps, saved {path}: {model.coefficients}")
    return model


def load_trace(args: argparse.Namespace, config: SimConfig) -> list[SimRequest]:
    """The dataset's requests (tokenized by the engine's tokenizer) at their arrival times."""
    if args.num_prompts < 1:
        raise ValueError(f"--num-prompts must be positive, got {args.num_prompts}")
    tokenizer = load_tokenizer(args.tokenizer)
    requests = sample_requests(args, tokenizer, args.num_prompts, config.max_model_len)
    # Real ids where prompts may share a prefix (the prefix dataset); lengths alone otherwise.
    token_ids = [r.prompt_token_ids or (tokenizer.encode(r.prompt) if args.dataset == "prefix" else None)
                 for r in requests]
    return make_trace([r.prompt_len for r in requests], [r.expected_output_len for r in requests],
                      args.request_rate, args.burstiness, args.seed, token_ids)


def run_dict(result: SimResult, config: SimConfig, cost_model: StepCostModel,
             args: argparse.Namespace) -> dict[str, Any]:
    """The run as `engine bench serve` saves one, plus what was simulated."""
    return {
        "label": args.label or f"simulated {config.policy} x{config.num_replicas}",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "simulated": True,
        "num_prompts": len(result.records),
        "request_rate": "inf" if math.isinf(args.request_rate) else args.request_rate,
        "burstiness": args.burstiness,
        "max_concurrency": None,
        "ignore_eos": True,
        "sim_config": asdict(config),
        "cost_model": cost_model.to_dict(),
        "num_steps": result.num_steps,
        "num_preemptions": result.num_preemptions,
        "sim_wall_s": result.wall_s,
        **result.summary(config.slo_ttft_ms, config.slo_tpot_ms),
    }
