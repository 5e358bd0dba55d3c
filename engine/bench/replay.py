"""Replay a timed trace through a real LLMEngine in this process, as an open-loop client would.

Each request is added when the wall clock passes its arrival time (stamped with that intended
time, so queueing behind a busy step counts in its TTFT), the engine steps while it has work, and
every request's token times are recorded from the step that produced them.  No HTTP: this is the
engine's own latency, what the scheduling policies change.  Results are `RequestRecord`s, so
`engine.bench.metrics.summarize` reads them like a `engine bench serve` run or a simulation.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from engine.bench.metrics import RequestRecord
from engine.request import SLOTarget
from engine.sampling_params import SamplingParams
from engine.scheduler.policy import AdmissionRejected

if TYPE_CHECKING:
    from engine.llm_engine import LLMEngine


@dataclass(frozen=True, slots=True)
class TraceRequest:
    prompt_token_ids: list[int]
    output_len: int  # generated exactly: greedy, EOS ignored
    arrival_time_s: float  # from the start of the replay
    priority: int = 0
    slo: SLOTarget | None = None
    # LLMEngine.add_request's elastic settings: elastic_level, prompt_keep ("auto" or values), min_level,
    # min_prompt_keep; empty: the engine's defaults.
    elastic: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class _Timeline:
    arrival_s: float
    token_times_s: list[float] = field(default_factory=list)
    token_levels: list[int] = field(default_factory=list)
    prompt_keep: float | None = None
    num_tokens: int = 0
    error: str | None = None
    finished: bool = False


def replay_trace(engine: LLMEngine, trace: Sequence[TraceRequest], *, desc: str = "replay",
                 show_progress: bool = True) -> tuple[list[RequestRecord], float]:
    """Run the trace to completion; the records (in trace order) and the wall time it took."""
    order = sorted(range(len(trace)), key=lambda i: trace[i].arrival_time_s)
    timelines: dict[str, _Timeline] = {}
    start = time.time()
    next_arrival = 0
    with tqdm(total=len(trace), desc=desc, disable=not show_progress) as bar:
        while next_arrival < len(order) or engine.has_unfinished_requests():
            now_s = time.time() - start
            while next_arrival < len(order) and trace[order[next_arrival]].arrival_time_s <= now_s:
                index = order[next_arrival]
                if not _add(engine, str(index), trace[index], start, timelines):
                    bar.update(1)
                next_arrival += 1
            if not engine.has_unfinished_requests():
                if next_arrival < len(order):
                    time.sleep(max(0.0, trace[order[next_arrival]].arrival_time_s - (time.time() - start)))
                continue
            outputs = engine.step()
            step_end_s = time.time() - start
            for output in outputs:
                bar.update(_record_tokens(timelines[output.request_id], output, step_end_s))
    duration_s = time.time() - start
    return [_record(trace[i], timelines[str(i)]) for i in range(len(trace))], duration_s


def _add(engine: LLMEngine, request_id: str, spec: TraceRequest, start: float,
         timelines: dict[str, _Timeline]) -> bool:
    """Add one request; False if the engine refused it (recorded as a failed request)."""
    timeline = timelines[request_id] = _Timeline(arrival_s=spec.arrival_time_s)
    params = SamplingParams(temperature=0.0, max_tokens=spec.output_len, ignore_eos=True)
    try:
        engine.add_request(request_id, spec.prompt_token_ids, params, arrival_time=start + spec.arrival_time_s,
                           priority=spec.priority, slo=spec.slo, **spec.elastic)
    except AdmissionRejected as rejection:
        timeline.error = f"rejected: {rejection.reason}"
        return False
    return True


def _record_tokens(timeline: _Timeline, output, now_s: float) -> int:
    """Note the tokens a step produced; 1 if the request finished (for the progress bar)."""
    num_tokens = len(output.outputs[0].token_ids)
    timeline.token_times_s += [now_s] * (num_tokens - timeline.num_tokens)
    timeline.token_levels += [output.elastic_level] * (num_tokens - timeline.num_tokens)
    timeline.prompt_keep = output.prompt_keep
    timeline.num_tokens = num_tokens
    if output.finished and not timeline.finished:
        timeline.finished = True
        return 1
    return 0


def _record(spec: TraceRequest, timeline: _Timeline) -> RequestRecord:
    prompt_len = len(spec.prompt_token_ids)
    if timeline.error is not None or not timeline.token_times_s:
        return RequestRecord(prompt_len=prompt_len, success=False, error=timeline.error or "no output",
                             arrival_time_s=timeline.arrival_s, start_time_s=timeline.arrival_s)
    times = timeline.token_times_s
    return RequestRecord(prompt_len=prompt_len, output_len=len(times), ttft_s=times[0] - timeline.arrival_s,
                         itl_s=[b - a for a, b in zip(times, times[1:])], e2el_s=times[-1] - timeline.arrival_s,
                         arrival_time_s=timeline.arrival_s, start_time_s=timeline.arrival_s,
                         token_levels=timeline.token_levels, prompt_keep=timeline.prompt_keep)
