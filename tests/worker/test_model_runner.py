"""The runner on plain data: it computes from NewRequestData and counts alone, never touching the
scheduler's live Request, and keeps its own copy of each request's tokens in step with sampling."""

from __future__ import annotations

import pytest

from engine.request import Request
from engine.sampling_params import SamplingParams
from engine.scheduler.output import NewRequestData, ScheduledRequest, SchedulerOutput
from tests.conftest import assert_kv_empty


class Untouchable:
    """Stands in for the live Request: any attribute read fails the test."""

    def __init__(self, request_id: str) -> None:
        object.__setattr__(self, "_id", request_id)

    def __getattr__(self, name: str):
        if name == "request_id":  # what ScheduledRequest copies into its own plain field
            return object.__getattribute__(self, "_id")
        raise AssertionError(f"the runner read Request.{name}")


def scheduled(request_id: str, start: int, count: int, block_ids: tuple[list[int], list[list[int]]], samples: bool,
              new: NewRequestData | None = None) -> ScheduledRequest:
    """`block_ids`: the request's tables of every KV group (an unpruned request: the same tokens)."""
    num_stages = len(block_ids[1])
    return ScheduledRequest(Untouchable(request_id), start, count, block_ids[0], samples, new_request=new,  # type: ignore[arg-type]
                            kept_block_ids=block_ids[1], num_kept_computed_tokens=(start,) * num_stages,
                            num_kept_scheduled_tokens=(count,) * num_stages)


def test_runner_reads_only_plain_data_and_matches_the_engine(llm_fp32):
    engine = llm_fp32.engine
    prompt = engine.tokenizer.encode("The capital of France is")
    params = SamplingParams(temperature=0.0, max_tokens=4)
    expected = llm_fp32.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0].outputs[0].token_ids
    assert_kv_empty(llm_fp32)

    request = Request(request_id="plain", prompt_token_ids=prompt, sampling_params=params, max_tokens=4)
    assert engine.kv.allocate_slots("plain", len(prompt) + 3)
    blocks = engine.kv.block_table("plain"), engine.kv.kept_block_tables("plain")
    try:
        runner = engine.runner
        first = scheduled("plain", 0, len(prompt), blocks, True, NewRequestData.of(request))
        tokens = [runner.execute(SchedulerOutput([first], len(prompt))).sampled["plain"].token_id]
        for step in range(3):  # decodes: counts only, the runner supplies the token it sampled
            item = scheduled("plain", len(prompt) + step, 1, blocks, True)
            tokens.append(runner.execute(SchedulerOutput([item], 1)).sampled["plain"].token_id)
        assert tokens == list(expected)
        runner.execute(SchedulerOutput([], 0, finished_request_ids={"plain"}))
        with pytest.raises(KeyError):
            runner.requests["plain"]
    finally:
        engine.kv.free("plain")


def test_a_preempted_request_restarts_from_new_request_data(llm_fp32):
    engine = llm_fp32.engine
    prompt = engine.tokenizer.encode("Once upon a time")
    params = SamplingParams(temperature=0.0, max_tokens=2)
    expected = llm_fp32.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0].outputs[0].token_ids
    request = Request(request_id="again", prompt_token_ids=prompt, sampling_params=params, max_tokens=2)
    assert engine.kv.allocate_slots("again", len(prompt) + 1)
    blocks = engine.kv.block_table("again"), engine.kv.kept_block_tables("again")
    try:
        runner = engine.runner
        first = scheduled("again", 0, len(prompt), blocks, True, NewRequestData.of(request))
        request.append_output_token(runner.execute(SchedulerOutput([first], len(prompt))).sampled["again"].token_id)
        # Preempted: the runner forgets it.  Restarted: its tokens so far come again, recomputed in one chunk.
        runner.execute(SchedulerOutput([], 0, preempted_request_ids={"again"}))
        with pytest.raises(KeyError):
            runner.requests["again"]
        restart = scheduled("again", 0, len(prompt) + 1, blocks, True, NewRequestData.of(request))
        request.append_output_token(runner.execute(SchedulerOutput([restart], len(prompt) + 1)).sampled["again"].token_id)
        assert request.output_token_ids == list(expected)
        runner.execute(SchedulerOutput([], 0, finished_request_ids={"again"}))
    finally:
        engine.kv.free("again")
