"""Every scheduling policy on the real model: same greedy tokens as FCFS, nothing lost under scarce KV."""

from __future__ import annotations

import time

import pytest

from engine import SamplingParams
from engine.config import MLFQConfig, SLOConfig
from tests.conftest import assert_kv_empty, make_llm

POLICIES = ["priority", "mlfq", "slo"]
# Targets loose enough that nothing is refused, tight enough that the SLO policy shrinks budgets.
SLO = SLOConfig(ttft_ms=60_000, tpot_ms=150, best_effort=True)


def mixed_batch(prompts: list[str]) -> tuple[list[str], list[SamplingParams], list[int]]:
    """Short and long prompts, short and long outputs, mixed priorities."""
    chosen = [prompts[0] * 6, *prompts[1:8]]  # one prompt of several chunks
    params = [SamplingParams(temperature=0.0, max_tokens=4 + 5 * (i % 4), ignore_eos=True) for i in range(8)]
    priorities = [i % 3 for i in range(8)]
    return chosen, params, priorities


@pytest.mark.parametrize("policy", POLICIES)
def test_policy_gives_fcfs_greedy_tokens(llm_fp32, sharegpt_prompts, policy):
    prompts, params, priorities = mixed_batch(sharegpt_prompts)
    reference = llm_fp32.generate(prompts, params, use_tqdm=False)
    # Four seats for eight requests: the policy decides who runs, pauses or is preempted.
    llm = make_llm(dtype="float32", max_num_batched_tokens=64, block_size=16, kv_cache_memory=0.25,
                   max_num_seqs=4, scheduling_policy=policy, slo=SLO,
                   mlfq=MLFQConfig(prefill_tokens_per_unit=32))
    outputs = llm.generate(prompts, params, use_tqdm=False, priority=priorities)
    assert [o.outputs[0].token_ids for o in outputs] == [o.outputs[0].token_ids for o in reference]
    assert all(o.finished for o in outputs)
    assert_kv_empty(llm)


@pytest.mark.parametrize("policy", ["fcfs", *POLICIES])
def test_tiny_kv_thirty_two_requests_all_finish(llm_fp32, sharegpt_prompts, policy):
    tokenizer = llm_fp32.get_tokenizer()
    max_tokens = 8
    longest = max(len(tokenizer.encode(p)) for p in sharegpt_prompts) + max_tokens
    num_blocks = -(-longest // 16) + 2  # one longest request and two spare blocks
    llm = make_llm(dtype="bfloat16", max_num_batched_tokens=128, block_size=16, num_kv_blocks=num_blocks,
                   scheduling_policy=policy, slo=SLO, mlfq=MLFQConfig(starvation_s=1.0))
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    outputs = llm.generate(sharegpt_prompts, params, use_tqdm=False, priority=[i % 4 for i in range(32)])
    assert len(outputs) == 32
    assert all(o.finished and len(o.outputs[0].token_ids) == max_tokens for o in outputs)
    assert llm.engine.scheduler.num_preemptions_total > 0
    assert_kv_empty(llm)


def test_slo_engine_profiles_a_cost_model_and_refines_it(llm_fp32, sharegpt_prompts):
    llm = make_llm(scheduling_policy="slo", slo=SLO, kv_cache_memory=0.25)
    model = llm.engine.cost_model
    assert model is not None and model.coefficients.overhead_s > 0
    before = model.coefficients
    llm.generate(sharegpt_prompts[:16], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True),
                 use_tqdm=False)
    assert model.coefficients != before  # refitted from the steps that ran
    stats = llm.engine.get_stats()
    assert stats.num_slo_attained_total + stats.num_slo_violated_total == 16
    assert_kv_empty(llm)


def test_slo_engine_learns_each_steps_whole_time(sharegpt_prompts, monkeypatch):
    """What the cost model observes is the whole step (scheduling, the model, the outputs): the
    period a running request's TPOT is made of.  A stall in the outputs shows up in every step."""
    llm = make_llm(scheduling_policy="slo", slo=SLO, kv_cache_memory=0.25)
    engine = llm.engine
    stall_s = 0.02
    observed, runner_s = [], []
    execute, outputs_for, observe = engine.runner.execute, engine.outputs.outputs_for, engine._observe_step

    def timed_execute(scheduler_output):
        start = time.perf_counter()
        try:
            return execute(scheduler_output)
        finally:
            runner_s.append(time.perf_counter() - start)

    def stalled_outputs(progressed):
        time.sleep(stall_s)
        return outputs_for(progressed)

    def recorded(scheduler_output, elapsed_s):
        observed.append(elapsed_s)
        observe(scheduler_output, elapsed_s)

    monkeypatch.setattr(engine.runner, "execute", timed_execute)
    monkeypatch.setattr(engine.outputs, "outputs_for", stalled_outputs)
    monkeypatch.setattr(engine, "_observe_step", recorded)
    llm.generate(sharegpt_prompts[:4], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    assert len(observed) == len(runner_s) > 0
    assert all(step_s >= model_s + stall_s for step_s, model_s in zip(observed, runner_s))
    assert_kv_empty(llm)
