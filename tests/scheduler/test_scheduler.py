"""Scheduler tests on fake runner outputs: no torch, no model, exact block and token accounting."""

from __future__ import annotations

import subprocess
import sys

import pytest

from engine.kv.kv_cache_manager import KVCacheManager
from engine.request import Request, RequestStatus
from engine.sampling_params import SamplingParams
from engine.scheduler.output import ModelRunnerOutput, SampledToken, SchedulerOutput
from engine.scheduler.policy import FCFSPolicy
from engine.scheduler.scheduler import Scheduler

EOS = 0


def make_scheduler(num_blocks=64, block_size=4, budget=16, max_num_seqs=8, max_model_len=1024) -> Scheduler:
    # Prompts here share prefixes (1, 2, 3, ...): prefix caching is off so token counts stay exact;
    # tests/scheduler/test_prefix_caching_scheduler.py covers it on.
    return Scheduler(KVCacheManager(num_blocks, block_size, enable_prefix_caching=False), FCFSPolicy(),
                     max_num_batched_tokens=budget, max_num_seqs=max_num_seqs, max_model_len=max_model_len)


def make_request(request_id: str, prompt_len: int, max_tokens: int = 4, arrival: float = 0.0, **params) -> Request:
    return Request(request_id=request_id, prompt_token_ids=list(range(1, prompt_len + 1)),
                   sampling_params=SamplingParams(max_tokens=max_tokens, **params), max_tokens=max_tokens,
                   eos_token_ids=frozenset({EOS}), arrival_time=arrival)


def fake_run(output: SchedulerOutput, token: int = 7) -> ModelRunnerOutput:
    return ModelRunnerOutput(sampled={s.request.request_id: SampledToken(token) for s in output.scheduled if s.samples})


def step(scheduler: Scheduler, token: int = 7) -> SchedulerOutput:
    output = scheduler.schedule()
    scheduler.update_from_output(output, fake_run(output, token))
    scheduler.kv.check_invariants()
    return output


def scheduled_tokens(output: SchedulerOutput) -> dict[str, int]:
    return {s.request.request_id: s.num_scheduled_tokens for s in output.scheduled}


def test_scheduler_imports_no_torch():
    code = ("import sys, engine.scheduler.scheduler, engine.kv.kv_cache_manager; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_long_prompt_is_chunked_over_steps():
    scheduler = make_scheduler(budget=16)
    scheduler.add_request(make_request("a", 40))
    assert scheduled_tokens(step(scheduler)) == {"a": 16}
    assert scheduled_tokens(step(scheduler)) == {"a": 16}
    out = step(scheduler)
    assert scheduled_tokens(out) == {"a": 8} and out.scheduled[0].samples
    assert scheduler.requests["a"].output_token_ids == [7]


def test_short_prompts_are_fused_into_one_step():
    scheduler = make_scheduler(budget=16)
    for i, n in enumerate([5, 6, 3]):
        scheduler.add_request(make_request(f"r{i}", n, arrival=i))
    assert scheduled_tokens(step(scheduler)) == {"r0": 5, "r1": 6, "r2": 3}


def test_decodes_go_first_and_prefill_fills_the_rest():
    scheduler = make_scheduler(budget=16)
    scheduler.add_request(make_request("a", 4, max_tokens=10, arrival=0))
    step(scheduler)  # a prefilled, now decoding
    scheduler.add_request(make_request("b", 40, arrival=1))
    out = step(scheduler)
    assert scheduled_tokens(out) == {"a": 1, "b": 15}
    assert out.scheduled[0].request.request_id == "a"  # decode first in the flattened batch
    out = step(scheduler)
    assert scheduled_tokens(out) == {"a": 1, "b": 15}  # decodes never stall behind the long prefill


def test_max_num_seqs_caps_the_batch():
    scheduler = make_scheduler(budget=64, max_num_seqs=2)
    for i in range(4):
        scheduler.add_request(make_request(f"r{i}", 3, arrival=i))
    assert set(scheduled_tokens(step(scheduler))) == {"r0", "r1"}
    assert scheduler.num_waiting == 2


def test_finishes_on_max_tokens_eos_and_stop_token_ids():
    scheduler = make_scheduler()
    scheduler.add_request(make_request("len", 3, max_tokens=2))
    scheduler.add_request(make_request("stop", 3, max_tokens=9, stop_token_ids=[7], arrival=1))
    scheduler.add_request(make_request("eos", 3, max_tokens=9, arrival=2))
    out = scheduler.schedule()
    runner = ModelRunnerOutput(sampled={"len": SampledToken(5), "stop": SampledToken(7), "eos": SampledToken(EOS)})
    scheduler.update_from_output(out, runner)
    requests = {s.request.request_id: s.request for s in out.scheduled}
    assert requests["stop"].status == RequestStatus.FINISHED_STOPPED and requests["stop"].stop_reason == 7
    assert requests["eos"].status == RequestStatus.FINISHED_STOPPED
    assert requests["len"].status == RequestStatus.RUNNING
    step(scheduler)
    assert requests["len"].status == RequestStatus.FINISHED_LENGTH
    assert scheduler.kv.pool.num_used_blocks == 0
    assert scheduler.schedule().finished_request_ids == {"len"}


def test_min_tokens_defers_eos_and_ignore_eos():
    scheduler = make_scheduler()
    scheduler.add_request(make_request("a", 3, max_tokens=5, min_tokens=2))
    scheduler.add_request(make_request("b", 3, max_tokens=3, ignore_eos=True, arrival=1))
    step(scheduler, token=EOS)
    assert scheduler.requests["a"].status == RequestStatus.RUNNING  # 1 token < min_tokens
    step(scheduler, token=EOS)
    assert "a" not in scheduler.requests  # now eos counts
    step(scheduler, token=EOS)
    assert "b" not in scheduler.requests  # ignore_eos: ran to max_tokens
    assert scheduler.kv.pool.num_used_blocks == 0


def test_preempts_newest_running_request_and_recomputes_it():
    # 6 blocks of 4 tokens = 24 slots.  Two requests of 8 prompt tokens take 4 blocks; decoding
    # grows them until one must go.
    scheduler = make_scheduler(num_blocks=6, block_size=4, budget=32)
    scheduler.add_request(make_request("old", 8, max_tokens=12, arrival=0))
    scheduler.add_request(make_request("new", 8, max_tokens=12, arrival=1))
    preempted = []
    for _ in range(40):
        if not scheduler.has_unfinished_requests():
            break
        out = step(scheduler)
        preempted += list(out.preempted_request_ids)
    assert not scheduler.has_unfinished_requests()
    assert preempted and set(preempted) == {"new"}  # FCFS: the newest is the victim
    assert scheduler.num_preemptions_total >= 1
    assert scheduler.kv.pool.num_used_blocks == 0


def test_many_requests_tiny_kv_all_finish():
    scheduler = make_scheduler(num_blocks=8, block_size=4, budget=16, max_num_seqs=8)
    for i in range(20):
        scheduler.add_request(make_request(f"r{i}", 5 + i % 7, max_tokens=6 + i % 5, arrival=i))
    finished = set()
    for _ in range(2000):
        if not scheduler.has_unfinished_requests():
            break
        before = set(scheduler.requests)
        step(scheduler)
        finished |= before - set(scheduler.requests)
    assert finished == {f"r{i}" for i in range(20)}
    assert scheduler.kv.pool.num_used_blocks == 0


def test_abort_frees_blocks_of_running_and_waiting():
    scheduler = make_scheduler(budget=8, max_num_seqs=1)
    scheduler.add_request(make_request("run", 6))
    scheduler.add_request(make_request("wait", 6, arrival=1))
    step(scheduler)
    assert scheduler.kv.pool.num_used_blocks == 2
    aborted = scheduler.finish_requests(["run", "wait", "unknown"], RequestStatus.FINISHED_ABORTED)
    assert {r.request_id for r in aborted} == {"run", "wait"}
    assert all(r.finish_reason == "abort" for r in aborted)
    assert scheduler.kv.pool.num_used_blocks == 0 and not scheduler.has_unfinished_requests()
    scheduler.kv.check_invariants()


def test_duplicate_request_id_is_refused():
    scheduler = make_scheduler()
    scheduler.add_request(make_request("a", 3))
    with pytest.raises(ValueError, match="already in use"):
        scheduler.add_request(make_request("a", 3))
