"""Prometheus metrics named like vLLM's (prefix `engine:`), and the periodic throughput log line.

Everything here is written from the engine thread (`record_step`, `record_outputs`,
`record_abort`), but for `record_request_errors`, which a request timeout calls from the event
loop's thread: prometheus-client guards every metric with its own lock, and `/metrics` reads the
registry under them.
prometheus-client appends `_total` to counter names, so Counters are declared without it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from engine.outputs import RequestMetrics, RequestOutput

logger = logging.getLogger(__name__)

TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
               10.0, 20.0, 40.0, 80.0]
REQUEST_LATENCY_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                           50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]
LOG_INTERVAL_S = 10.0
# engine:request_errors_total's reasons: the engine's (LLMEngine._fail), a failed step (every
# request in it), a dead engine loop, a request past --request-timeout, and one the shutdown
# deadline cut short.
REQUEST_ERROR_REASONS = ("detokenize", "nonfinite_logits", "internal", "engine_step", "engine_loop", "timeout",
                         "shutdown")


def buckets_1_2_5(max_value: int) -> list[float]:
    """1, 2, 5, 10, 20, 50, ... up to max_value: token-count buckets like vLLM's."""
    buckets: list[float] = []
    exponent = 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10 ** exponent
            if value > max_value:
                return buckets
            buckets.append(value)
        exponent += 1


class EngineMetrics:
    def __init__(self, model_name: str, max_model_len: int, max_num_batched_tokens: int = 8192,
                 elastic_levels: Sequence[int] = (100,), prompt_keeps: Sequence[float] = (1.0,)) -> None:
        """`elastic_levels`, `prompt_keeps`: the series of the per-level and per-keep counters to
        export from the start (others appear when first used)."""
        self.registry = CollectorRegistry(auto_describe=True)
        self.model_name = model_name
        self._add_gauges_and_counters()
        self._add_labelled_counters(elastic_levels, prompt_keeps)
        self._add_histograms(max_model_len, max_num_batched_tokens)
        self.stat_logger = StatLogger()
        self._last_totals: dict[str, int] = {}  # engine-side running totals already exported
        self._progress: dict[str, list[_SampleProgress]] = {}  # request id -> per sample

    def _gauge(self, name: str, doc: str) -> Any:
        return Gauge(name, doc, ["model_name"], registry=self.registry).labels(self.model_name)

    def _counter(self, name: str, doc: str) -> Any:
        return Counter(name, doc, ["model_name"], registry=self.registry).labels(self.model_name)

    def _histogram(self, name: str, doc: str, buckets: list[float]) -> Any:
        return Histogram(name, doc, ["model_name"], buckets=buckets, registry=self.registry).labels(self.model_name)

    def _add_gauges_and_counters(self) -> None:
        self.num_requests_running = self._gauge("engine:num_requests_running", "Requests in the running batch.")
        self.num_requests_waiting = self._gauge("engine:num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_cache_usage_perc = self._gauge("engine:kv_cache_usage_perc", "KV cache usage, 0 to 1.")
        self.prompt_tokens = self._counter("engine:prompt_tokens", "Prefill tokens processed.")
        self.generation_tokens = self._counter("engine:generation_tokens", "Tokens generated.")
        self.num_preemptions = self._counter("engine:num_preemptions", "Cumulative preemptions.")
        self.prefix_cache_queries = self._counter("engine:prefix_cache_queries",
                                                  "Prompt tokens looked up in the prefix cache.")
        self.prefix_cache_hits = self._counter("engine:prefix_cache_hits", "Prompt tokens found in the prefix cache.")
        self.pruned_prompt_tokens = self._counter(
            "engine:pruned_prompt_tokens", "Prompt tokens prompt pruning kept out of the layers past the prune layer.")
        self.slo_attained = self._counter("engine:slo_attained", "Finished requests that met every latency target.")
        self.slo_violated = self._counter("engine:slo_violated", "Finished requests that missed a latency target.")
        # With `engine serve --check-invariants`: KV bookkeeping checked whenever the engine goes idle.
        self.invariant_checks = self._counter("engine:invariant_checks", "Idle-time checks of the KV invariants.")
        self.invariant_violations = self._counter("engine:invariant_violations",
                                                  "Idle-time checks of the KV invariants that failed.")

    def _add_labelled_counters(self, elastic_levels: Sequence[int], prompt_keeps: Sequence[float]) -> None:
        """Counters with a second label; every known series is exported from the start."""
        self._requests_rejected = Counter("engine:requests_rejected", "Requests the scheduling policy refused.",
                                          ["model_name", "reason"], registry=self.registry)
        for reason in ("slo_ttft_unattainable", "slo_tpot_unattainable"):
            self._requests_rejected.labels(self.model_name, reason)
        self._request_success = Counter("engine:request_success", "Finished requests by finish reason.",
                                        ["model_name", "finished_reason"], registry=self.registry)
        for reason in ("stop", "length", "abort", "error"):  # export every series from the start
            self._request_success.labels(self.model_name, reason)
        self._request_errors = Counter("engine:request_errors", "Requests that failed alone, by the stage that failed.",
                                       ["model_name", "reason"], registry=self.registry)
        for reason in REQUEST_ERROR_REASONS:
            self._request_errors.labels(self.model_name, reason)
        self._elastic_tokens = Counter("engine:elastic_generation_tokens",
                                       "Tokens generated, by the elastic level that generated them.",
                                       ["model_name", "level"], registry=self.registry)
        self._prompt_keep = Counter("engine:elastic_prompt_keep_requests",
                                    "Finished requests, by the prompt_keep their prompt ran at (1: whole).",
                                    ["model_name", "keep"], registry=self.registry)
        for level in elastic_levels:
            self._elastic_tokens.labels(self.model_name, str(level))
        for keep in prompt_keeps:
            self._prompt_keep.labels(self.model_name, f"{keep:g}")

    def _add_histograms(self, max_model_len: int, max_num_batched_tokens: int) -> None:
        token_buckets = buckets_1_2_5(max_model_len)
        self.time_to_first_token = self._histogram("engine:time_to_first_token_seconds",
                                                   "Time to first token.", TTFT_BUCKETS)
        self.inter_token_latency = self._histogram("engine:inter_token_latency_seconds",
                                                   "Time between consecutive output tokens.", ITL_BUCKETS)
        self.e2e_request_latency = self._histogram("engine:e2e_request_latency_seconds",
                                                   "Arrival to finish.", REQUEST_LATENCY_BUCKETS)
        self.request_queue_time = self._histogram("engine:request_queue_time_seconds",
                                                  "Arrival to first scheduled.", REQUEST_LATENCY_BUCKETS)
        self.request_prefill_time = self._histogram("engine:request_prefill_time_seconds",
                                                    "First scheduled to first token.", REQUEST_LATENCY_BUCKETS)
        self.request_decode_time = self._histogram("engine:request_decode_time_seconds",
                                                   "First token to last token.", REQUEST_LATENCY_BUCKETS)
        self.request_prompt_tokens = self._histogram("engine:request_prompt_tokens",
                                                     "Prompt length of finished requests.", token_buckets)
        self.request_generation_tokens = self._histogram("engine:request_generation_tokens",
                                                         "Generated length of finished requests.", token_buckets)
        self.iteration_tokens = self._histogram("engine:iteration_tokens_total", "Tokens scheduled per step.",
                                                buckets_1_2_5(max(max_num_batched_tokens, 1)))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def record_step(self, stats: Any) -> None:
        """Gauges and counters from one step's `EngineStats`."""
        self.set_gauges(stats)
        self.prompt_tokens.inc(stats.num_prompt_tokens_step)
        self.generation_tokens.inc(stats.num_generation_tokens_step)
        if stats.num_batched_tokens_step > 0:
            self.iteration_tokens.observe(stats.num_batched_tokens_step)
        self.record_totals(stats)
        self.stat_logger.record(stats, time.monotonic())

    def record_totals(self, stats: Any) -> None:
        """Counters the engine keeps as running totals: export what grew since the last call."""
        totals = {"preemptions": stats.num_preemptions_total, "prefix_queries": stats.prefix_cache_queries_total,
                  "prefix_hits": stats.prefix_cache_hits_total, "slo_attained": stats.num_slo_attained_total,
                  "slo_violated": stats.num_slo_violated_total,
                  "pruned_prompt_tokens": stats.num_pruned_prompt_tokens_total,
                  **{f"rejected:{reason}": count for reason, count in stats.num_rejected_total.items()},
                  **{f"error:{reason}": count for reason, count in stats.num_request_errors_total.items()}}
        for key, total in totals.items():
            new = total - self._last_totals.get(key, 0)
            if new > 0:
                self._counter_for(key).inc(new)
            self._last_totals[key] = total

    def _counter_for(self, key: str) -> Any:
        if key.startswith("rejected:"):
            return self._requests_rejected.labels(self.model_name, key.removeprefix("rejected:"))
        if key.startswith("error:"):
            return self._request_errors.labels(self.model_name, key.removeprefix("error:"))
        return {"preemptions": self.num_preemptions, "prefix_queries": self.prefix_cache_queries,
                "prefix_hits": self.prefix_cache_hits, "slo_attained": self.slo_attained,
                "slo_violated": self.slo_violated, "pruned_prompt_tokens": self.pruned_prompt_tokens}[key]

    def record_request_errors(self, reason: str, count: int = 1) -> None:
        """Requests the serving loop ended with an error (a failed step, a timeout, the shutdown)."""
        self._request_errors.labels(self.model_name, reason).inc(count)

    def forget(self, request_id: str) -> None:
        """Drop a request's progress that will never finish (the serving loop failed it)."""
        self._progress.pop(request_id, None)

    def set_gauges(self, stats: Any) -> None:
        self.num_requests_running.set(stats.num_running)
        self.num_requests_waiting.set(stats.num_waiting)
        self.kv_cache_usage_perc.set(stats.kv_cache_usage)

    def set_idle(self) -> None:
        self.num_requests_running.set(0)
        self.num_requests_waiting.set(0)
        self.kv_cache_usage_perc.set(0.0)

    def record_outputs(self, outputs: list[RequestOutput], now: float) -> None:
        """TTFT and inter-token latency as tokens appear; request histograms as samples finish.
        `now` is wall-clock time (time.time()), the clock of RequestMetrics."""
        for output in outputs:
            progress = self._progress.setdefault(
                output.request_id, [_SampleProgress() for _ in output.outputs])
            for i, completion in enumerate(output.outputs):
                sample = progress[i]
                if sample.is_finished:
                    continue
                self._record_new_tokens(output, i, sample, now)
                if completion.finish_reason is not None:
                    sample.is_finished = True
                    self._record_finished(output, i, now)
            if output.finished:
                del self._progress[output.request_id]

    def _record_new_tokens(self, output: RequestOutput, index: int, sample: _SampleProgress, now: float) -> None:
        num_tokens = len(output.outputs[index].token_ids)
        if num_tokens <= sample.num_tokens:
            return
        if sample.num_tokens == 0:
            metrics = _sample_metrics(output, index)
            first_token_time = (metrics.first_token_time if metrics else None) or now
            arrival_time = metrics.arrival_time if metrics else now
            self.time_to_first_token.observe(max(0.0, first_token_time - arrival_time))
        else:  # a step usually adds one token; spread the interval if it added more
            interval = (now - sample.last_token_time) / (num_tokens - sample.num_tokens)
            self.inter_token_latency.observe(max(0.0, interval))
        self._elastic_tokens.labels(self.model_name, str(output.elastic_level)).inc(num_tokens - sample.num_tokens)
        sample.num_tokens, sample.last_token_time = num_tokens, now

    def record_abort(self, request_id: str, num_samples: int) -> None:
        """A request aborted before it finished (client gone): count each unfinished sample."""
        progress = self._progress.pop(request_id, None)
        if progress is not None:
            num_samples = sum(not sample.is_finished for sample in progress)
        self._request_success.labels(self.model_name, "abort").inc(num_samples)

    def _record_finished(self, output: RequestOutput, index: int, now: float) -> None:
        completion = output.outputs[index]
        self._request_success.labels(self.model_name, completion.finish_reason).inc()
        self._prompt_keep.labels(self.model_name, f"{output.prompt_keep:g}").inc()
        self.request_prompt_tokens.observe(len(output.prompt_token_ids))
        self.request_generation_tokens.observe(len(completion.token_ids))
        metrics = _sample_metrics(output, index)
        if metrics is None:
            return
        self.e2e_request_latency.observe((metrics.finished_time or now) - metrics.arrival_time)
        if metrics.first_scheduled_time is not None:
            self.request_queue_time.observe(metrics.first_scheduled_time - metrics.arrival_time)
            if metrics.first_token_time is not None:
                self.request_prefill_time.observe(metrics.first_token_time - metrics.first_scheduled_time)
        if metrics.first_token_time is not None and metrics.last_token_time is not None:
            self.request_decode_time.observe(metrics.last_token_time - metrics.first_token_time)


def _sample_metrics(output: RequestOutput, index: int) -> RequestMetrics | None:
    if index < len(output.sample_metrics):
        return output.sample_metrics[index]
    return output.metrics


@dataclass(slots=True)
class _SampleProgress:
    num_tokens: int = 0  # generated tokens already seen
    last_token_time: float = 0.0
    is_finished: bool = False


@dataclass
class StatLogger:
    """Every LOG_INTERVAL_S while busy, one line like vLLM's: throughput, queue, KV usage."""

    interval_s: float = LOG_INTERVAL_S
    enabled: bool = True
    last_log_time: float = field(default_factory=time.monotonic)
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0

    def record(self, stats: Any, now: float) -> None:
        self.num_prompt_tokens += stats.num_prompt_tokens_step
        self.num_generation_tokens += stats.num_generation_tokens_step
        elapsed = now - self.last_log_time
        if elapsed < self.interval_s:
            return
        if self.enabled and (self.num_prompt_tokens or self.num_generation_tokens
                             or stats.num_running or stats.num_waiting):
            logger.info(self.format_line(stats, elapsed))
        self.last_log_time = now
        self.num_prompt_tokens = self.num_generation_tokens = 0

    def format_line(self, stats: Any, elapsed: float) -> str:
        return (f"Avg prompt throughput: {self.num_prompt_tokens / elapsed:.1f} tokens/s, "
                f"Avg generation throughput: {self.num_generation_tokens / elapsed:.1f} tokens/s, "
                f"Running: {stats.num_running} reqs, Waiting: {stats.num_waiting} reqs, "
                f"KV cache usage: {100 * stats.kv_cache_usage:.1f}%")
