"""Prompt pruning in the scheduler, on fake runner outputs: stage-A chunks, the stage-B step, the
budget a pruned chunk costs, both pools' invariants every step, and preemption replaying the
kept set.  No torch."""

from __future__ import annotations

import math

import pytest

from engine.kv.kv_cache_groups import KVCacheGroups
from engine.prompt_pruning import PrunePlan
from engine.request import Request
from engine.sampling_params import SamplingParams
from engine.scheduler.cost_model import StepFeatures
from engine.scheduler.output import ModelRunnerOutput, SampledToken, SchedulerOutput
from engine.scheduler.policy import FCFSPolicy
from engine.scheduler.scheduler import Scheduler

BLOCK = 4


def make_scheduler(num_blocks=64, budget=16, max_num_seqs=8) -> Scheduler:
    kv = KVCacheGroups.create(num_blocks, BLOCK, enable_prefix_caching=False)
    return Scheduler(kv, FCFSPolicy(), max_num_batched_tokens=budget, max_num_seqs=max_num_seqs, max_model_len=1024)


def make_request(request_id: str, prompt_len: int, plan: PrunePlan | None = None, max_tokens: int = 3,
                 arrival: float = 0.0) -> Request:
    return Request(request_id=request_id, prompt_token_ids=list(range(1, prompt_len + 1)),
                   sampling_params=SamplingParams(max_tokens=max_tokens), max_tokens=max_tokens, prune_plan=plan,
                   arrival_time=arrival)


def fake_run(output: SchedulerOutput) -> ModelRunnerOutput:
    """Samples token 7 where asked; a stage-B step reports its kept set (the first K positions)."""
    kept = {s.request_id: tuple(tuple(range(k)) for k in s.request.prune_plan.kept_per_stage) for s in output.scheduled
            if s.request.prune_plan is not None and s.request.kept_prompt_positions is None
            and s.request.prune_plan.is_stage_b_step(s.num_computed_tokens, s.num_scheduled_tokens)}
    return ModelRunnerOutput(sampled={s.request_id: SampledToken(7) for s in output.scheduled if s.samples},
                             kept_prompt_positions=kept)


def step(scheduler: Scheduler) -> SchedulerOutput:
    output = scheduler.schedule()
    scheduler.update_from_output(output, fake_run(output))
    scheduler.kv.check_invariants({r.request_id: r.prune_plan for r in scheduler.running})
    for pool in (scheduler.kv.full.pool, scheduler.kv.stages[0].pool):
        assert pool.num_free_blocks + pool.num_used_blocks == pool.num_blocks
    return output


def ranges(output: SchedulerOutput) -> dict[str, tuple[int, int, int, int]]:
    """request -> (c, n, group-B start, group-B count)"""
    return {s.request_id: (s.num_computed_tokens, s.num_scheduled_tokens, s.num_kept_computed_tokens[0],
                           s.num_kept_scheduled_tokens[0]) for s in output.scheduled}


def test_plan_prunes_only_long_prompts_and_keeps_at_least_sinks_and_window():
    make = dict(min_prompt_tokens=64, num_sink_tokens=4, window=8, fractions=(0.5,))
    assert PrunePlan.make(63, 0.3, **make) is None
    assert PrunePlan.make(100, 1.0, **make) is None
    assert PrunePlan.make(100, 0.3, **make).num_kept_prompt_tokens == 30
    assert PrunePlan.make(100, 0.01, **make).num_kept_prompt_tokens == 12
    plan = PrunePlan(100, (30,), 8, (0.5,))
    assert [plan.num_kept(c) for c in (0, 99, 100, 103)] == [0, 0, 30, 33]
    assert plan.cost(0, 40) == 20 and plan.cost(92, 8) == 4 + 15 and plan.cost(100, 1) == 1


def test_two_stage_plan_keeps_nested_geometric_counts_and_costs_each_group():
    """Stage s of S keeps keep^(s/S): at keep 0.25 over two stages, 50% then 25%; a row of group s
    costs its share f_s of the layers."""
    make = dict(min_prompt_tokens=64, num_sink_tokens=4, window=8, fractions=(0.2, 0.5))
    plan = PrunePlan.make(100, 0.25, **make)
    assert plan.kept_per_stage == (50, 25) and plan.num_kept_prompt_tokens == 25 and plan.num_pruned_tokens == 75
    assert [plan.num_kept(101, s) for s in (0, 1)] == [51, 26]
    # Stage A: 30% of a token; the stage-B step adds 50 rows x 0.2 and 25 rows x 0.5; decodes cost 1.
    assert plan.cost(0, 40) == 12 and plan.cost(92, 8) == math.ceil(8 * 0.3 + 50 * 0.2 + 25 * 0.5)
    assert plan.cost(100, 1) == 1
    assert PrunePlan.make(100, 0.01, **make).kept_per_stage == (12, 12)  # sinks and window at least


def test_a_pruned_chunk_is_priced_at_what_it_computes():
    """Stage-A chunks run the shallow 30% of the layers; the stage-B step adds each group's kept
    rows against its kept keys; a decode reads the shorter deep groups' keys."""
    make = dict(min_prompt_tokens=64, num_sink_tokens=4, window=8, fractions=(0.2, 0.5))
    plan = PrunePlan.make(100, 0.25, **make)  # kept (50, 25)
    assert plan.layer_counts(0, 40) == pytest.approx((40 * 0.3, 40 * 0.3, 40 * 40 * 0.3))
    rows, keys, pairs = plan.layer_counts(92, 8)
    assert rows == pytest.approx(8 * 0.3 + 50 * 0.2 + 25 * 0.5)
    assert pairs == pytest.approx(8 * 100 * 0.3 + 50 * 50 * 0.2 + 25 * 25 * 0.5)
    assert plan.layer_counts(100, 1)[:2] == pytest.approx((1.0, 101 * 0.3 + 51 * 0.2 + 26 * 0.5))
    whole = StepFeatures.of_chunk(0, 40, False)
    pruned = StepFeatures.of_chunk(0, 40, False, plan)
    assert pruned.num_scheduled_tokens == 12 and pruned.num_prefill_attention_pairs == 480
    assert whole.num_scheduled_tokens == 40 and pruned.num_prefill_seqs == whole.num_prefill_seqs == 1


def test_two_stage_request_schedules_both_deep_groups_and_replays_both_sets():
    kv = KVCacheGroups.create(64, BLOCK, enable_prefix_caching=False, num_stages=2)
    scheduler = Scheduler(kv, FCFSPolicy(), max_num_batched_tokens=16, max_num_seqs=8, max_model_len=1024)
    plan = PrunePlan(num_prompt_tokens=40, kept_per_stage=(20, 10), window=8, fractions=(0.2, 0.5))
    scheduler.add_request(make_request("p", 40, plan))
    outputs = [scheduler.schedule()]
    scheduler.update_from_output(outputs[0], fake_run(outputs[0]))
    while not any(s.num_kept_scheduled_tokens[0] for s in outputs[-1].scheduled):
        outputs.append(scheduler.schedule())
        scheduler.update_from_output(outputs[-1], fake_run(outputs[-1]))
        kv.check_invariants({r.request_id: r.prune_plan for r in scheduler.running})
    stage_b = outputs[-1].scheduled[0]
    assert stage_b.num_kept_computed_tokens == (0, 0) and stage_b.num_kept_scheduled_tokens == (20, 10)
    assert [len(t) for t in stage_b.kept_block_ids] == [5, 3]
    assert scheduler.requests["p"].kept_prompt_positions == (tuple(range(20)), tuple(range(10)))
    decode = scheduler.schedule().scheduled[0]
    assert decode.num_kept_computed_tokens == (20, 10) and decode.num_kept_scheduled_tokens == (1, 1)


def test_pruned_prompt_runs_stage_a_chunks_then_one_stage_b_step():
    scheduler = make_scheduler(budget=16)
    plan = PrunePlan(num_prompt_tokens=40, kept_per_stage=(12,), window=8, fractions=(0.5,))
    scheduler.add_request(make_request("p", 40, plan))
    # Stage A costs half a token a token: 32 tokens fit a 16-token budget, but a chunk may not end
    # inside the window [32, 40), so the second chunk stops at 32... then covers the window whole.
    assert ranges(step(scheduler)) == {"p": (0, 32, 0, 0)}
    out = step(scheduler)
    assert ranges(out) == {"p": (32, 8, 0, 12)} and out.scheduled[0].samples
    assert len(out.scheduled[0].kept_block_ids[0]) == 3 and len(out.scheduled[0].block_ids) == 10
    assert ranges(step(scheduler)) == {"p": (40, 1, 12, 1)}  # decodes run every layer
    assert scheduler.requests["p"].kept_prompt_positions == (tuple(range(12)),)


def test_stage_b_step_overruns_the_budget_once_and_fills_the_step():
    scheduler = make_scheduler(budget=16)
    plan = PrunePlan(num_prompt_tokens=24, kept_per_stage=(20,), window=8, fractions=(0.5,))
    scheduler.add_request(make_request("p", 24, plan))
    scheduler.add_request(make_request("u", 8, arrival=1.0))
    out = step(scheduler)  # 24 tokens cost 12, its 20 kept rows 10 more: nothing else fits
    assert ranges(out) == {"p": (0, 24, 0, 20)}
    assert ranges(step(scheduler)) == {"p": (24, 1, 20, 1), "u": (0, 8, 0, 8)}


def test_chunk_never_ends_inside_the_window():
    scheduler = make_scheduler(budget=16)
    scheduler.add_request(make_request("u", 13))
    plan = PrunePlan(num_prompt_tokens=20, kept_per_stage=(17,), window=16, fractions=(0.5,))
    scheduler.add_request(make_request("p", 20, plan, arrival=1.0))
    # 3 budget tokens left buy 6 stage-A tokens, which would end inside the window [4, 20): 4.
    assert ranges(step(scheduler)) == {"u": (0, 13, 0, 13), "p": (0, 4, 0, 0)}
    assert ranges(step(scheduler))["p"] == (4, 16, 0, 17)


def test_preempted_pruned_request_is_recomputed_with_its_kept_set():
    """u (24 tokens, growing) and p (pruned, 32 tokens) fill 14 of 16 group-A blocks; when u's
    decodes need more, the newest running request, p, is preempted and later recomputed."""
    scheduler = make_scheduler(num_blocks=16, budget=64, max_num_seqs=2)
    plan = PrunePlan(num_prompt_tokens=32, kept_per_stage=(8,), window=4, fractions=(0.5,))
    scheduler.add_request(make_request("u", 24, max_tokens=30))
    scheduler.add_request(make_request("p", 32, plan, max_tokens=12, arrival=1.0))
    step(scheduler)
    assert scheduler.requests["p"].kept_prompt_positions == (tuple(range(8)),)
    while scheduler.num_preemptions_total == 0:
        step(scheduler)
    assert scheduler.requests["p"].num_computed_tokens == 0
    assert scheduler.requests["p"].kept_prompt_positions == (tuple(range(8)),)
    while scheduler.has_unfinished_requests():
        out = step(scheduler)
        restarted = [s for s in out.scheduled if s.request_id == "p" and s.new_request is not None]
        if restarted:
            assert restarted[0].new_request.kept_prompt_positions == (tuple(range(8)),)
            c, n = restarted[0].num_computed_tokens, restarted[0].num_scheduled_tokens
            assert (restarted[0].num_kept_computed_tokens[0], restarted[0].num_kept_scheduled_tokens[0]) == (
                plan.num_kept(c), plan.num_kept(c + n) - plan.num_kept(c))
            break
    else:
        pytest.fail("p never restarted")


def test_prune_layers_flag_and_config_refuse_a_bad_list():
    import argparse

    from engine.config import ConfigError, PromptPruningConfig
    from engine.prompt_pruning import default_prune_layers, parse_prune_layers

    assert parse_prune_layers("15,18") == (15, 18) and parse_prune_layers("9") == (9,)
    with pytest.raises(argparse.ArgumentTypeError, match="layer numbers"):
        parse_prune_layers("15,x")
    for bad in ((18, 15), (0, 4), ()):
        with pytest.raises(ConfigError, match="prune_layers"):
            PromptPruningConfig(prune_layers=bad)
    with pytest.raises(ConfigError, match="score_window"):
        PromptPruningConfig(window=8, score_window=16)
    assert default_prune_layers(30) == (15, 19) and default_prune_layers(2) == (1,)
