"""LLMEngine: add requests, step, read outputs.  Wires tokenizer, scheduler, KV bookkeeping,
model runner and output processing together; decides nothing itself."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace

from engine.config import PROMPT_SCORINGS, ConfigError, EngineConfig, SchedulerConfig
from engine.elastic.checkpoint import ElasticCheckpoint
from engine.elastic.loading import load_elastic_checkpoint
from engine.elastic.quality_table import load_quality_table
from engine.elastic.spec import FULL_LEVEL
from engine.fault_injection import FaultInjector
from engine.kv.kv_cache_groups import KVCacheGroups
from engine.model.loader import resolve_model, load_tokenizer
from engine.output_processor import OutputProcessor
from engine.outputs import RequestOutput
from engine.profiling import profile_level_costs, profile_step_costs
from engine.prompt_pruning import PrunePlan, stage_fractions
from engine.request import Request, RequestStatus, SLOTarget
from engine.sampling_params import SamplingParams
from engine.scheduler.cost_model import StepCostModel, features_of, features_of_scheduled
from engine.scheduler.elastic_choice import AUTO, KEEP_LADDER, ElasticChoice, allowed_keeps
from engine.scheduler.knob_costs import KnobCosts, StepLevels
from engine.scheduler.output import ModelRunnerOutput, SchedulerOutput
from engine.scheduler.policy import FCFSPolicy
from engine.scheduler.policy_factory import make_policy
from engine.scheduler.scheduler import Scheduler
from engine.worker.model_runner import ModelRunner
from engine.worker.tensor_parallel import TensorParallelRunner

logger = logging.getLogger(__name__)


class RequestFault(Exception):
    """Processing one request failed at a known stage (`reason`); it fails alone."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class InvalidRequestError(ValueError):
    """A request the engine cannot serve as given; `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(slots=True)
class EngineStats:
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    num_preemptions_total: int = 0
    num_prompt_tokens_step: int = 0  # prompt tokens whose KV the last step computed
    num_generation_tokens_step: int = 0  # tokens sampled in the last step
    num_batched_tokens_step: int = 0
    num_rejected_total: dict[str, int] = field(default_factory=dict)  # reason -> refused requests
    num_slo_attained_total: int = 0  # finished samples that met every latency target they had
    num_slo_violated_total: int = 0
    prefix_cache_queries_total: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits_total: int = 0  # of which found
    num_pruned_prompt_tokens_total: int = 0  # prompt tokens the layers past the prune layer skipped
    num_request_errors_total: dict[str, int] = field(default_factory=dict)  # reason -> requests failed alone


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        source = resolve_model(config.model.model)
        self.model_name = config.model.served_model_name or source.name
        self.max_model_len = min(config.model.max_model_len or source.arch.max_position_embeddings,
                                 source.arch.max_position_embeddings)
        self.tokenizer = load_tokenizer(source)
        elastic = load_elastic_checkpoint(config.model, source)
        self.runner = self._make_runner(source, elastic)
        self.default_elastic_level = self._default_elastic_level(config.model.elastic_level)
        self.kv = KVCacheGroups.create(self.runner.num_kv_blocks, config.cache.block_size,
                                       enable_prefix_caching=config.cache.enable_prefix_caching,
                                       num_stages=len(self.runner.prune_layers))
        scheduler_config: SchedulerConfig = replace(config.scheduler, max_model_len=self.max_model_len)
        self.scheduler = Scheduler(self.kv, FCFSPolicy(),
                                   max_num_batched_tokens=scheduler_config.max_num_batched_tokens,
                                   max_num_seqs=scheduler_config.max_num_seqs,
                                   max_model_len=self.max_model_len)
        # The step cost model, for policies that predict step times: profiled now by running real
        # steps (under FCFS, with no request yet), then refined from every step the engine runs.
        self.cost_model: StepCostModel | None = None
        self.knob_costs: KnobCosts | None = None  # what elastic levels and pruning save (slo policy only)
        choice = None
        if scheduler_config.policy == "slo":
            self.cost_model = self._profile_cost_model()
            choice = self._elastic_choice(elastic)
        self.scheduler.policy = make_policy(scheduler_config, self.cost_model, choice)
        self.outputs = OutputProcessor(self.tokenizer)
        self.stats = EngineStats()
        self.faults = FaultInjector.from_env()  # a test hook, None unless set (engine/fault_injection.py)
        logger.info("engine ready: model=%s dtype=%s weights=%s max_model_len=%d kv_blocks=%d x %d tokens (%.2f GiB)",
                    self.model_name, self.runner.dtype_name, self.runner.plan.weights_label, self.max_model_len,
                    self.runner.num_kv_blocks,
                    config.cache.block_size, self.runner.kv_cache_bytes / (1 << 30))

    def _make_runner(self, source, elastic: ElasticCheckpoint | None) -> ModelRunner | TensorParallelRunner:
        """The model runner: in this process, or the driver of a tensor-parallel group."""
        config = self.config
        if config.parallel.tensor_parallel_size > 1:
            return TensorParallelRunner(source, config.model.dtype, config.cache, config.runner,
                                        config.parallel.tensor_parallel_size, config.model.weight_format,
                                        config.prompt_pruning, elastic)
        return ModelRunner(source, config.model.dtype, config.cache, config.runner,
                           weight_format=config.model.weight_format, elastic=elastic, pruning=config.prompt_pruning)

    def shutdown(self) -> None:
        """Stop the tensor-parallel ranks, if any (an engine in one process holds nothing to stop)."""
        if isinstance(self.runner, TensorParallelRunner):
            self.runner.shutdown()

    # ---- requests ----------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams, *,
                    arrival_time: float | None = None, priority: int = 0, slo: SLOTarget | None = None,
                    elastic_level: int | str | None = None, prompt_keep: float | str | None = None,
                    prompt_scoring: str | None = None, min_level: int | None = None,
                    min_prompt_keep: float | None = None) -> None:
        """Queue a request.  Raises InvalidRequestError for a request the engine cannot serve, and
        AdmissionRejected when the scheduling policy refuses it (an unreachable latency target).
        `elastic_level`: the submodel it runs (None: the engine's default level; "auto": the SLO
        policy's choice each step, never below `min_level`).  `prompt_keep`: the fraction of a
        long prompt the layers past the prune layer compute (None: the default; "auto": the SLO
        policy's choice on arrival, never below `min_prompt_keep`); `prompt_scoring`: "attention"
        or "random" (the baseline; None: the engine's setting).  With --elastic-auto, a request
        that names neither level nor keep leaves both to the policy."""
        if request_id in self.outputs.parents:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", "request_id")
        if self.config.model.elastic_auto and elastic_level is None and prompt_keep is None:
            elastic_level = prompt_keep = AUTO
        level, level_auto = self._resolve_elastic_level(elastic_level)
        floors = self._elastic_floors(min_level, min_prompt_keep)
        prompt_token_ids = self._prompt_token_ids(prompt)
        keep_options = self._keep_options(len(prompt_token_ids), prompt_keep, floors[1], prompt_scoring)
        prune_plan = keep_options[max(keep_options)]
        if params.prompt_logprobs is not None:
            keep_options = {1.0: None}  # every prompt row must reach the LM head to be scored
            prune_plan = None
        max_tokens = self._resolve_max_tokens(len(prompt_token_ids), params.max_tokens)
        arrival_time = time.time() if arrival_time is None else arrival_time
        slo_defaults = self.config.scheduler.slo
        slo = SLOTarget.resolve(slo, slo_defaults.ttft_ms, slo_defaults.tpot_ms)
        children = [Request(request_id=request_id if params.n == 1 else f"{request_id}#{i}",
                            prompt_token_ids=prompt_token_ids,
                            sampling_params=params if params.n == 1 else params.for_child(i),
                            max_tokens=max_tokens, eos_token_ids=self.tokenizer.stop_token_ids,
                            arrival_time=arrival_time, priority=priority, slo=slo, elastic_level=level,
                            prune_plan=prune_plan, prompt_keep=max(keep_options), elastic_auto=level_auto,
                            min_level=floors[0], min_prompt_keep=floors[1],
                            keep_options=keep_options if len(keep_options) > 1 else None)
                    for i in range(params.n)]
        self.scheduler.add_requests(children)
        self.outputs.add(request_id, prompt if isinstance(prompt, str) else None, children)

    @property
    def elastic_levels(self) -> tuple[int, ...] | None:
        """The model's elastic levels, the full model first; None for a model that is not elastic."""
        return self.runner.elastic_levels

    def _default_elastic_level(self, level: int) -> int:
        levels = self.elastic_levels or (FULL_LEVEL,)
        if level not in levels:
            raise ConfigError(f"elastic_level {level} is not one of the model's levels {list(levels)}")
        return level

    def _resolve_elastic_level(self, requested: int | str | None) -> tuple[int, bool]:
        """(the level to start at, whether the SLO policy chooses it from then on)."""
        levels = self.elastic_levels
        if requested is None:
            return self.default_elastic_level, False
        if requested == AUTO:
            if levels is None:
                raise InvalidRequestError(f"elastic level \"auto\" asked of {self.model_name}, which is not elastic "
                                          "(serve it with --elastic on)", "elastic.level")
            return levels[0], True  # the full model until the policy chooses
        return self._model_level(requested, "elastic.level"), False

    def _model_level(self, requested: object, field: str) -> int:
        levels = self.elastic_levels
        if isinstance(requested, bool) or not isinstance(requested, int):
            raise InvalidRequestError(f"{field} must be an integer level or \"auto\", got {requested!r}", field)
        if levels is None:
            if requested == FULL_LEVEL:
                return requested
            raise InvalidRequestError(f"elastic level {requested} asked of {self.model_name}, which is not elastic "
                                      "(serve it with --elastic on)", field)
        if requested not in levels:
            raise InvalidRequestError(f"unknown elastic level {requested}; {self.model_name} has levels "
                                      f"{list(levels)}", field)
        return requested

    def _elastic_floors(self, min_level: int | None, min_prompt_keep: float | None) -> tuple[int | None, float | None]:
        """The request's quality floors for the SLO policy's choice, checked."""
        if min_level is not None:
            min_level = self._model_level(min_level, "elastic.min_level")
        if min_prompt_keep is not None and (isinstance(min_prompt_keep, bool) or not isinstance(min_prompt_keep, int | float)
                                            or not 0 < min_prompt_keep <= 1):
            raise InvalidRequestError(f"elastic.min_prompt_keep must be a number in (0, 1], got {min_prompt_keep!r}",
                                      "elastic.min_prompt_keep")
        return min_level, min_prompt_keep

    def _keep_options(self, num_prompt_tokens: int, prompt_keep: float | str | None, min_keep: float | None,
                      scoring: str | None) -> dict[float, PrunePlan | None]:
        """prompt_keep -> prune plan: the one keep asked for, or for "auto" every keep of the
        choice's ladder at or above the floor (only the whole prompt where pruning is off).  A
        keep that prunes nothing (a prompt under min_prompt_tokens) is the whole prompt, 1.0: so
        usage and metrics report what ran, and the SLO policy does not count a short prompt's
        "pruning" as saved time or lost quality (at 0.5x load, chats were reported at keep
        0.3-0.5 with every token computed)."""
        if prompt_keep != AUTO:
            keep = self.config.prompt_pruning.default_keep if prompt_keep is None else prompt_keep
            plan = self._prune_plan(num_prompt_tokens, keep, scoring)
            return {keep if plan is not None else 1.0: plan}
        ladder = KEEP_LADDER if self.runner.prune_layers else (1.0,)
        plans = {keep: self._prune_plan(num_prompt_tokens, keep, scoring) for keep in allowed_keeps(min_keep, ladder)}
        return {keep if plan is not None else 1.0: plan for keep, plan in plans.items()}

    def _prune_plan(self, num_prompt_tokens: int, prompt_keep: float | None,
                    scoring: str | None = None) -> PrunePlan | None:
        config = self.config.prompt_pruning
        scoring = config.scoring if scoring is None else scoring
        if scoring not in PROMPT_SCORINGS:
            raise InvalidRequestError(f"prompt scoring must be one of {PROMPT_SCORINGS}, got {scoring!r}",
                                      "elastic.prompt_scoring")
        keep = config.default_keep if prompt_keep is None else prompt_keep
        if isinstance(keep, bool) or not isinstance(keep, int | float) or not 0 < keep <= 1:
            raise InvalidRequestError(f"elastic.prompt_keep must be a number in (0, 1], got {keep!r}",
                                      "elastic.prompt_keep")
        prune_layers = self.runner.prune_layers
        if not prune_layers:
            if keep < 1:
                raise InvalidRequestError("prompt pruning is off on this server (prompt_keep must be 1)",
                                          "elastic.prompt_keep")
            return None
        return PrunePlan.make(num_prompt_tokens, keep, min_prompt_tokens=config.min_prompt_tokens,
                              num_sink_tokens=config.num_sink_tokens, window=config.window,
                              fractions=stage_fractions(prune_layers, len(self.runner.model.layers)),
                              scoring=scoring, score_window=config.score_window)

    def _prompt_token_ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            token_ids = self.tokenizer.encode(prompt)
        else:
            token_ids = list(prompt)
            vocab_size = self.tokenizer.vocab_size
            bad = [t for t in token_ids if not isinstance(t, int) or not 0 <= t < vocab_size]
            if bad:
                raise InvalidRequestError(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})",
                                          "prompt")
        if not token_ids:
            raise InvalidRequestError("the prompt is empty", "prompt")
        return token_ids

    def _resolve_max_tokens(self, num_prompt_tokens: int, max_tokens: int | None) -> int:
        room = self.max_model_len - num_prompt_tokens
        if room < 1 or (max_tokens is not None and max_tokens > room):
            asked = num_prompt_tokens + (max_tokens or 1)
            raise InvalidRequestError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{asked} tokens ({num_prompt_tokens} in the messages, {max_tokens or 1} in the completion). "
                "Please reduce the length of the messages or completion.", "max_tokens")
        capacity = self.kv.pool.num_blocks * self.kv.block_size
        if max_tokens is None:  # up to the context window, and never past what the KV cache holds
            max_tokens = max(1, min(room, capacity - num_prompt_tokens))
        if num_prompt_tokens + max_tokens > capacity:
            raise InvalidRequestError(f"prompt + max_tokens ({num_prompt_tokens + max_tokens} tokens) exceeds the "
                                      f"KV cache capacity ({capacity} tokens)", "max_tokens")
        return max_tokens

    def abort_request(self, request_ids: list[str]) -> None:
        """End requests now and free their KV; unknown ids are ignored."""
        child_ids = [c for request_id in request_ids for c in self.outputs.child_ids(request_id)]
        aborted = self.scheduler.finish_requests(child_ids, RequestStatus.FINISHED_ABORTED)
        for request in aborted:
            self.outputs.on_finished(request)
        self.outputs.outputs_for(aborted)  # drops the finished parents' state

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    # ---- one iteration -----------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        # The cost model learns the whole step's time, scheduling and outputs included: a running
        # request's TPOT is the period of the steps, not the model's share of it.  PERF: outside
        # the runner a step took ~1 ms on the 2-vCPU EPYC (the slo policy's choice, detokenizing,
        # outputs), ~5% of a 16-row decode step, which the policy's TPOT predictions had missed.
        start = time.perf_counter()
        scheduler_output = self.scheduler.schedule()
        runner_output = self.runner.execute(scheduler_output)
        progressed = self.scheduler.update_from_output(scheduler_output, runner_output)
        self.stats.num_pruned_prompt_tokens_total += sum(
            s.request.prune_plan.num_pruned_tokens for s in scheduler_output.scheduled
            if s.request_id in runner_output.kept_prompt_positions)
        now = time.time()
        for request in progressed:
            if request.status is RequestStatus.FINISHED_ERROR:
                continue  # a sibling sample's failure ended it already
            try:
                self._on_new_token(request, runner_output, now)
            except Exception as error:  # this request's own failure: it ends, the others go on
                self._fail(request, error)
        self._update_stats(scheduler_output, runner_output)
        outputs = self.outputs.outputs_for(progressed)
        if self.cost_model is not None and not scheduler_output.is_empty:
            self._observe_step(scheduler_output, time.perf_counter() - start)
        return outputs

    def _on_new_token(self, request: Request, runner_output: ModelRunnerOutput, now: float) -> None:
        metrics = request.metrics
        if metrics.first_token_time is None:
            metrics.first_token_time = now
        metrics.last_token_time = now
        sampled = runner_output.sampled[request.request_id]
        if not sampled.logits_finite:
            raise RequestFault("nonfinite_logits", "the model's logits for this request were not finite")
        prompt_logprobs = runner_output.prompt_logprobs.get(request.request_id)
        if prompt_logprobs is not None:
            self.outputs.on_prompt_logprobs(request, prompt_logprobs)
        try:
            if self.faults is not None:
                self.faults.check("detokenize", request.prompt_token_ids)
            stop = self.outputs.on_token(request, sampled)  # text, stop strings, logprobs
        except Exception as error:
            raise RequestFault("detokenize", f"turning its tokens into text failed: {error}") from error
        if stop is not None:
            if request.is_finished:  # the same token also hit a length limit: the stop wins
                request.status = RequestStatus.FINISHED_STOPPED
            else:
                self.scheduler.finish_requests([request.request_id], RequestStatus.FINISHED_STOPPED)
            request.stop_reason = stop
        if request.is_finished:
            metrics.finished_time = now
            self._count_slo(request)
            self.outputs.on_finished(request)

    def _fail(self, request: Request, error: Exception) -> None:
        """End the request (and its parent's other samples) with finish_reason "error", free its
        KV and count it by reason.  Only the reason and a short message reach the client; the
        traceback goes to the log."""
        reason = error.reason if isinstance(error, RequestFault) else "internal"
        logger.error("Request %s failed (%s); the engine goes on", request.request_id, reason, exc_info=error)
        siblings = self.outputs.fail(request.request_id, reason, f"Processing this request failed ({reason}).")
        self.scheduler.finish_requests([r.request_id for r in siblings if not r.is_finished],
                                       RequestStatus.FINISHED_ERROR)
        now = time.time()
        for sibling in siblings:
            sibling.status = RequestStatus.FINISHED_ERROR  # also one that had just finished otherwise
            sibling.metrics.finished_time = sibling.metrics.finished_time or now
            self.outputs.on_finished(sibling)
        errors = self.stats.num_request_errors_total
        errors[reason] = errors.get(reason, 0) + 1

    def _count_slo(self, request: Request) -> None:
        if request.slo is None:
            return
        metrics = request.metrics
        ttft_s = metrics.first_token_time - metrics.arrival_time
        tpot_s = None
        if request.num_output_tokens > 1:
            tpot_s = (metrics.last_token_time - metrics.first_token_time) / (request.num_output_tokens - 1)
        if request.slo.attained(ttft_s, tpot_s):
            self.stats.num_slo_attained_total += 1
        else:
            self.stats.num_slo_violated_total += 1

    def _update_stats(self, scheduler_output: SchedulerOutput, runner_output: ModelRunnerOutput) -> None:
        stats = self.stats
        stats.num_running = self.scheduler.num_running
        stats.num_waiting = self.scheduler.num_waiting
        stats.kv_cache_usage = self.kv.usage
        stats.num_preemptions_total = self.scheduler.num_preemptions_total
        stats.num_rejected_total = dict(self.scheduler.num_rejected_total)
        stats.prefix_cache_queries_total = self.kv.prefix_cache_queries_total
        stats.prefix_cache_hits_total = self.kv.prefix_cache_hits_total
        stats.num_batched_tokens_step = scheduler_output.num_batched_tokens
        stats.num_generation_tokens_step = len(runner_output.sampled)
        stats.num_prompt_tokens_step = sum(
            max(0, min(s.num_computed_tokens + s.num_scheduled_tokens, s.request.num_prompt_tokens)
                - s.num_computed_tokens) for s in scheduler_output.scheduled)

    def get_stats(self) -> EngineStats:
        """Queue and KV figures as of now (so an abort shows at once); per-step counts as of the
        last step."""
        return replace(self.stats, num_running=self.scheduler.num_running, num_waiting=self.scheduler.num_waiting,
                       kv_cache_usage=self.kv.usage, num_rejected_total=dict(self.scheduler.num_rejected_total))

    def _observe_step(self, scheduler_output: SchedulerOutput, elapsed_s: float) -> None:
        """Refine the step cost model from full-level steps, and a level's cost fractions from
        steps at that level (against the cost model's full-level prediction; a step whose chunks
        and decodes run at different levels teaches its chunks' level, KnobCosts.observe_step).
        Never both from one step: a fraction fitted against a prediction that was itself fitted
        through that fraction feeds back on itself (a fraction that dips inflates the model, which
        lowers the next observed fraction, and so on: measured here, it ran away within a minute)."""
        features = features_of(scheduler_output)
        levels = StepLevels.of(scheduler_output.scheduled)
        costs = self.knob_costs
        if costs is None or levels.widest not in costs.decode_fraction or (
                levels.widest == FULL_LEVEL and not levels.is_mixed):
            self.cost_model.observe(features, elapsed_s)
            return
        decodes_s = 0.0 if not levels.is_mixed else self.cost_model.predict_s(
            features_of_scheduled(s for s in scheduler_output.scheduled if s.num_scheduled_tokens == 1))
        costs.observe_step(levels, self.cost_model.predict_s(features), decodes_s, elapsed_s,
                           self.cost_model.attention_share(features))

    def _elastic_choice(self, checkpoint: ElasticCheckpoint | None) -> ElasticChoice | None:
        """How the slo policy picks settings for auto requests: each level's measured cost
        fractions (profiled now) and the quality table; None when the model has no knob."""
        prune_layers = self.runner.prune_layers
        if checkpoint is None and not prune_layers:
            return None
        shares = stage_fractions(prune_layers, len(self.runner.model.layers)) if prune_layers else ()
        levels = self.elastic_levels or (FULL_LEVEL,)
        start = time.perf_counter()
        self.knob_costs = profile_level_costs(self, levels, shares, self.runner.prefill_attention_fractions,
                                              self.cost_model.attention_share)
        logger.info("elastic knob costs profiled in %.1f s: %s", time.perf_counter() - start, self.knob_costs.as_dict())
        return ElasticChoice(self.knob_costs, load_quality_table(None if checkpoint is None else checkpoint.directory))

    def _profile_cost_model(self) -> StepCostModel:
        start = time.perf_counter()
        model = StepCostModel.fit(profile_step_costs(self), description=f"profiled {self.model_name} at start-up",
                                  one_call=self.runner.one_call_steps)
        logger.info("step cost model profiled in %.1f s: %s", time.perf_counter() - start, model)
        return model

    def memory_report(self) -> dict[str, int]:
        return {"weights_bytes": self.runner.weights_bytes, "kv_cache_bytes": self.runner.kv_cache_bytes}

    def check_invariants(self) -> None:
        """KV bookkeeping is consistent with the scheduler's view (tests call this every step)."""
        self.kv.check_invariants({r.request_id: r.prune_plan for r in self.scheduler.running})
        running = {r.request_id for r in self.scheduler.running}
        assert self.kv.request_ids() <= running, "a request that is not running holds KV blocks"
