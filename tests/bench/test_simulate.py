"""The simulator: the real scheduler on a virtual clock, stepped by a cost model.  No torch, no model
(but the last test, which runs the command on the real tokenizer)."""

from __future__ import annotations

import argparse
from dataclasses import replace
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine.bench.simulate import (COST_PROFILES, Replica, SimConfig, SimRequest, add_arguments, main, make_trace,
                                   simulate)
from engine.request import SLOTarget
from engine.scheduler.cost_model import CostCoefficients, StepCostModel, StepFeatures
from engine.scheduler.knob_costs import KnobCosts

MODEL = StepCostModel(CostCoefficients(overhead_s=0.015, per_scheduled_token_s=3e-4, per_sampled_seq_s=6e-4,
                                       per_decode_context_token_s=2e-6, per_prefill_attention_pair_s=8e-7))
SMALL = SimConfig(max_num_batched_tokens=256, max_num_seqs=16, num_kv_blocks=512, block_size=16)


def sharegpt_like_lengths(num_requests: int, seed: int = 0) -> tuple[list[int], list[int]]:
    rng = random.Random(seed)
    return ([rng.randint(8, 400) for _ in range(num_requests)], [rng.randint(4, 120) for _ in range(num_requests)])


def trace(num_requests: int, request_rate: float, seed: int = 0) -> list[SimRequest]:
    return make_trace(*sharegpt_like_lengths(num_requests, seed), request_rate=request_rate, seed=seed)


def mean_ttft_ms(requests: list[SimRequest], config: SimConfig = SMALL) -> float:
    return simulate(requests, config, MODEL).summary()["mean_ttft_ms"]


def test_simulator_imports_no_torch() -> None:
    code = "import sys, engine.bench.simulate; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_small_trace_finishes_every_request_with_kv_invariants_kept() -> None:
    requests = trace(40, request_rate=8.0)
    # Few KV blocks for 16 seats: preemption happens, and the bookkeeping must survive it.
    config = SimConfig(max_num_batched_tokens=256, max_num_seqs=16, num_kv_blocks=48, block_size=16)

    def check(replica: Replica) -> None:
        replica.scheduler.kv.check_invariants()
        assert replica.scheduler.kv.request_ids() <= {r.request_id for r in replica.scheduler.running}

    result = simulate(requests, config, MODEL, on_step=check)
    assert result.num_preemptions > 0
    assert all(record.success for record in result.records)
    assert [r.output_len for r in result.records] == [r.output_len for r in requests]
    for spec, record in zip(requests, result.records):
        assert record.ttft_s >= 0 and record.e2el_s >= record.ttft_s
        assert len(record.itl_s) == spec.output_len - 1 and min(record.itl_s, default=0) > 0
    assert result.duration_s >= max(r.arrival_time_s + rec.e2el_s for r, rec in zip(requests, result.records)) - 1e-9


def test_one_request_alone_takes_exactly_the_predicted_step_times() -> None:
    request = SimRequest(prompt_len=100, output_len=3, arrival_time_s=2.5)
    record = simulate([request], SMALL, MODEL).records[0]
    prefill_s = MODEL.predict_s(StepFeatures.of_chunk(0, 100, True))
    assert record.ttft_s == pytest.approx(prefill_s)  # the idle replica waited for it, not before
    decode_s = [MODEL.predict_s(StepFeatures.of_chunk(context, 1, True)) for context in (100, 101)]
    assert record.itl_s == pytest.approx(decode_s)
    assert record.e2el_s == pytest.approx(prefill_s + sum(decode_s))


def test_steps_mixing_decodes_and_prefills_take_the_measured_mixed_overrun() -> None:
    model = StepCostModel(MODEL.coefficients)
    model.mixed_step_excess_s = 0.007  # what the engine measured of its mixed steps
    model.mixed_step_ratio = 1.4  # the slo policy's form of it: the simulator adds the seconds
    first = SimRequest(prompt_len=100, output_len=40, arrival_time_s=0.0)
    second = SimRequest(prompt_len=60, output_len=2, arrival_time_s=0.001)  # joins while the first decodes
    alone = simulate([first], SMALL, model)
    with_mixed = simulate([first, second], SMALL, model).records[0]
    plain = simulate([first, second], SMALL, MODEL).records[0]
    # The first request's second token comes in the step that prefills the second request.
    mixed_step = StepFeatures.of_chunk(100, 1, True) + StepFeatures.of_chunk(0, 60, True)
    assert with_mixed.itl_s[0] == pytest.approx(model.predict_s(mixed_step) + 0.007)
    assert plain.itl_s[0] == pytest.approx(MODEL.predict_s(mixed_step))
    assert alone.records[0].itl_s[0] == pytest.approx(model.predict_s(StepFeatures.of_chunk(100, 1, True)))


def test_spread_arrivals_wait_less_than_all_at_once() -> None:
    lengths = sharegpt_like_lengths(60)
    burst = make_trace(*lengths, request_rate=float("inf"))
    spread = make_trace(*lengths, request_rate=2.0)
    assert mean_ttft_ms(spread) < 0.5 * mean_ttft_ms(burst)


def test_the_same_seed_gives_the_same_result() -> None:
    first = simulate(trace(50, 6.0, seed=3), SMALL, MODEL).summary()
    again = simulate(trace(50, 6.0, seed=3), SMALL, MODEL).summary()
    other = simulate(trace(50, 6.0, seed=4), SMALL, MODEL).summary()
    assert first["ttfts"] == again["ttfts"] and first["itls"] == again["itls"]
    assert first["ttfts"] != other["ttfts"]


def test_more_replicas_wait_less_under_load() -> None:
    requests = trace(120, request_rate=12.0)
    ttfts = [mean_ttft_ms(requests, SimConfig(**{**vars(SMALL), "num_replicas": n})) for n in (1, 2, 4)]
    assert ttfts[0] > ttfts[1] > ttfts[2]


def test_round_robin_deals_requests_in_turn() -> None:
    requests = trace(12, request_rate=100.0)
    config = SimConfig(**{**vars(SMALL), "num_replicas": 3, "dispatch": "round-robin"})
    seen: dict[int, set[str]] = {}

    def note(replica: Replica) -> None:
        seen.setdefault(id(replica), set()).update(r.request_id for r in replica.scheduler.running)

    simulate(requests, config, MODEL, on_step=note)
    by_replica = sorted(sorted(int(i) for i in ids) for ids in seen.values())
    assert by_replica == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8, 11]]


def test_a_request_larger_than_the_kv_cache_fails_without_stalling() -> None:
    config = SimConfig(**{**vars(SMALL), "num_kv_blocks": 8})  # 128 tokens
    result = simulate([SimRequest(200, 10, 0.0), SimRequest(20, 10, 0.1)], config, MODEL)
    assert [r.success for r in result.records] == [False, True]
    assert "KV capacity" in result.records[0].error


def test_the_slo_policy_runs_in_the_simulator() -> None:
    config = SimConfig(**{**vars(SMALL), "policy": "slo", "slo_ttft_ms": 2000.0, "slo_tpot_ms": 200.0})
    result = simulate(trace(40, request_rate=4.0), config, MODEL)
    summary = result.summary(config.slo_ttft_ms, config.slo_tpot_ms)
    assert summary["completed"] + summary["failed"] == 40
    assert all(r.success or r.error.startswith("rejected") for r in result.records)


def test_slo_best_effort_serves_last_what_the_default_refuses() -> None:
    """As `engine serve --slo-best-effort`: requests whose TTFT target is out of reach stay in the
    simulated queue, served after the rest, instead of leaving it refused (and the run shorter)."""
    config = SimConfig(**{**vars(SMALL), "policy": "slo", "slo_ttft_ms": 300.0, "slo_tpot_ms": 200.0})
    requests = trace(40, request_rate=40.0)
    refused = simulate(requests, config, MODEL)
    served = simulate(requests, replace(config, slo_best_effort=True), MODEL)
    assert any(r.error and r.error.startswith("rejected") for r in refused.records)
    assert all(r.success for r in served.records)
    assert served.duration_s > refused.duration_s


def test_the_simulator_models_elastic_levels_and_pruned_prompts() -> None:
    """Auto requests under a tight TPOT target run below the full level, whose steps cost the
    level's fraction: more of them meet the target than of the same trace at the full level."""
    costs = KnobCosts((100, 70, 40), {100: 1.0, 70: 0.8, 40: 0.6}, {100: 1.0, 70: 0.75, 40: 0.5}, (0.2, 0.3))
    config = SimConfig(**{**vars(SMALL), "policy": "slo", "knob_costs": costs})
    slo = SLOTarget(ttft_s=30.0, tpot_s=0.02)
    base = trace(24, request_rate=50.0)
    auto = [replace(r, slo=slo, elastic_level="auto", prompt_keep="auto") for r in base]
    full = [replace(r, slo=slo, elastic_level=100) for r in base]
    auto_result, full_result = simulate(auto, config, MODEL), simulate(full, config, MODEL)
    levels = [level for r in auto_result.records for level in r.token_levels]
    assert min(levels) < 100 and all(level in (100, 70, 40) for level in levels)
    assert {level for r in full_result.records for level in r.token_levels} == {100}
    attained = [result.summary(None, 20.0)["slo_attainment"] for result in (auto_result, full_result)]
    assert attained[0] > attained[1], attained


def test_the_simulator_prunes_only_prompts_the_engine_would() -> None:
    """A prompt under min_pruned_prompt_tokens runs whole (keep 1.0) whatever keep it asks, as in
    the engine; a long one keeps what it asked."""
    costs = KnobCosts((100, 40), {100: 1.0, 40: 0.6}, {100: 1.0, 40: 0.5}, (0.2, 0.3))
    config = SimConfig(**{**vars(SMALL), "policy": "slo", "knob_costs": costs, "min_pruned_prompt_tokens": 64})
    requests = [SimRequest(32, 4, 0.0, prompt_keep=0.3), SimRequest(128, 4, 0.0, prompt_keep=0.3),
                SimRequest(32, 4, 0.0, prompt_keep="auto", min_prompt_keep=0.3)]
    result = simulate(requests, config, MODEL)
    assert [r.prompt_keep for r in result.records] == [1.0, 0.3, 1.0]


def test_built_in_profiles_predict_sane_step_times() -> None:
    for name, profile in COST_PROFILES.items():
        model = profile.cost_model()
        decode = model.predict_s(StepFeatures.of_chunk(1000, 1, True))
        full = model.predict_s(StepFeatures.of_chunk(0, profile.max_num_batched_tokens, True))
        assert 0.005 < decode < full < 2.0, name


def test_the_command_simulates_and_saves(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    out = tmp_path / "sim.json"
    args = parser.parse_args(["--dataset", "random", "--num-prompts", "30", "--random-input-len", "64",
                              "--random-output-len", "16", "--request-rate", "4", "--num-replicas", "2",
                              "--slo-ttft-ms", "500", "--save-result", str(out)])
    main(args)
    saved = json.loads(out.read_text())
    assert saved["completed"] == 30 and saved["simulated"] and saved["request_goodput"] is not None
    assert saved["sim_config"]["num_replicas"] == 2 and np.isfinite(saved["mean_ttft_ms"])
    assert out.with_suffix(".md").exists()


@pytest.mark.slow
def test_profiling_the_real_engine_leaves_its_kv_empty(llm_bf16) -> None:
    """What `--fit-cost-model` runs: synthetic steps through the real runner, then real steps timed."""
    from engine import SamplingParams
    from engine.profiling import ProfileStep, decodes, prefill, profile_step_costs, timed_step
    from engine.scheduler.cost_model import features_of_chunks
    from tests.conftest import assert_kv_empty

    engine = llm_bf16.engine
    steps = [ProfileStep("prefill", (prefill(48),)), ProfileStep("decodes", decodes(4, 200)),
             ProfileStep("mixed", (*decodes(2, 64), prefill(30, 16, samples=False)))]
    samples = profile_step_costs(engine, steps, num_repeats=2)
    assert [s.features.num_prefill_seqs for s in samples] == [1, 0, 1] and all(s.elapsed_s > 0 for s in samples)
    assert [s.features.num_scheduled_tokens for s in samples] == [48, 4, 32]
    assert_kv_empty(llm_bf16)

    engine.add_request("timed", list(range(100, 120)), SamplingParams(max_tokens=2, ignore_eos=True))
    _, first = timed_step(engine)
    _, second = timed_step(engine)
    assert first.features == features_of_chunks([(0, 20, True)])
    assert second.features == features_of_chunks([(20, 1, True)])
    assert not engine.has_unfinished_requests()
    assert_kv_empty(llm_bf16)
