"""The step cost model: features, the non-negative fit, online refinement, JSON.  No torch."""

from __future__ import annotations

import dataclasses
import itertools
import json
import random
import subprocess
import sys

import numpy as np
import pytest

from engine.kv.kv_cache_manager import KVCacheManager
from engine.prompt_pruning import PrunePlan
from engine.request import Request
from engine.sampling_params import SamplingParams
from engine.scheduler.cost_model import (CostCoefficients, OneCallSteps, OnlineFitConfig, StepCostModel, StepFeatures,
                                         StepSample, features_of, features_of_chunks, nnls, relative_errors)
from engine.scheduler.policy import FCFSPolicy
from engine.scheduler.scheduler import Scheduler

TRUE = CostCoefficients(overhead_s=0.015, per_scheduled_token_s=3e-4, per_prefill_seq_s=3e-3, per_sampled_seq_s=6e-4,
                        per_decode_context_token_s=2e-6, per_prefill_attention_pair_s=8e-7, per_prefill_step_s=0.012)


def true_time(features: StepFeatures, coefficients: CostCoefficients = TRUE,
              one_call: OneCallSteps | None = None) -> float:
    """The step's time under `coefficients`; a step with prefill chunks pays per_prefill_step_s once,
    or, within `one_call`'s bounds, per_one_call_prefill_token_s for each of its chunks' tokens and
    per_one_call_prefill_pair_s for each of their pairs."""
    layer_by_layer = features.num_prefill_seqs > 0 and (one_call is None or not one_call.covers(features))
    one_call_tokens = 0 if layer_by_layer else features.num_prefill_tokens
    one_call_pairs = 0 if layer_by_layer else features.num_prefill_attention_pairs
    row = (1, *features.as_tuple()[:5], float(layer_by_layer), one_call_tokens, one_call_pairs)
    return float(np.dot(coefficients.as_tuple(), row))


def synthetic_steps(seed: int = 0, num_steps: int = 200) -> list[StepFeatures]:
    """Decode batches, prefill chunks (some not sampling) and mixed steps, like a scheduler makes."""
    rng = random.Random(seed)
    steps = []
    for _ in range(num_steps):
        chunks = [(rng.randint(16, 2000), 1, True) for _ in range(rng.choice([0, 1, 4, 16, 48]))]
        for _ in range(rng.choice([0, 0, 1, 2, 8])):
            chunks.append((rng.choice([0, 0, 256, 1024]), rng.randint(8, 512), rng.random() < 0.5))
        if chunks:
            steps.append(features_of_chunks(chunks))
    return steps


def noisy_samples(steps: list[StepFeatures], noise: float, seed: int = 1,
                  coefficients: CostCoefficients = TRUE) -> list[StepSample]:
    rng = np.random.default_rng(seed)
    return [StepSample(f, true_time(f, coefficients) * (1 + noise * rng.standard_normal())) for f in steps]


# ---- features ----------------------------------------------------------------------------------

def test_cost_model_imports_no_torch() -> None:
    code = "import sys, engine.scheduler.cost_model; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_chunk_features_count_each_kind_of_work() -> None:
    decode = StepFeatures.of_chunk(num_computed_tokens=99, num_scheduled_tokens=1, samples=True)
    assert decode == StepFeatures(num_scheduled_tokens=1, num_prefill_seqs=0, num_sampled_seqs=1,
                                  num_decode_context_tokens=100, num_prefill_attention_pairs=0, num_prefill_tokens=0)
    chunk = StepFeatures.of_chunk(num_computed_tokens=64, num_scheduled_tokens=32, samples=False)
    assert chunk == StepFeatures(num_scheduled_tokens=32, num_prefill_seqs=1, num_sampled_seqs=0,
                                 num_decode_context_tokens=0, num_prefill_attention_pairs=32 * 96, num_prefill_tokens=32)
    assert features_of_chunks([(99, 1, True), (64, 32, False)]) == decode + chunk
    assert features_of_chunks([]).is_empty


def make_request(request_id: str, prompt_len: int, first_token_id: int, max_tokens: int = 8) -> Request:
    return Request(request_id=request_id, prompt_token_ids=list(range(first_token_id, first_token_id + prompt_len)),
                   sampling_params=SamplingParams(max_tokens=max_tokens), max_tokens=max_tokens)


def test_features_of_a_real_scheduler_output() -> None:
    scheduler = Scheduler(KVCacheManager(64, 4), FCFSPolicy(), max_num_batched_tokens=16, max_num_seqs=8,
                          max_model_len=1024)
    scheduler.add_request(make_request("a", 5, first_token_id=1))
    first = scheduler.schedule()  # a: prefill of 5, samples
    assert features_of(first) == StepFeatures(5, 1, 1, 0, 5 * 5, 5)
    scheduler.update_from_output(first, _sampled(first))
    scheduler.add_request(make_request("b", 40, first_token_id=100))  # no shared prefix
    second = scheduler.schedule()  # a decodes at context 5, b gets the other 15 tokens
    assert [(s.num_computed_tokens, s.num_scheduled_tokens, s.samples) for s in second.scheduled] == \
        [(5, 1, True), (0, 15, False)]
    assert features_of(second) == StepFeatures(16, 1, 1, 6, 15 * 15, 15)


def _sampled(output):
    from engine.scheduler.output import ModelRunnerOutput, SampledToken
    return ModelRunnerOutput(sampled={s.request.request_id: SampledToken(7) for s in output.scheduled if s.samples})


# ---- fitting -----------------------------------------------------------------------------------

def test_nnls_finds_the_constrained_optimum() -> None:
    rng = np.random.default_rng(3)
    a = rng.standard_normal((30, 4))
    b = a @ np.array([1.0, -2.0, 0.5, 3.0]) + 0.01 * rng.standard_normal(30)
    x = nnls(a, b)
    assert (x >= 0).all() and x[1] == 0
    # The optimum over every active set (brute force) is no better.
    best = min(np.linalg.norm(a[:, list(s)] @ np.linalg.lstsq(a[:, list(s)], b, rcond=None)[0] - b)
               for r in range(1, 5) for s in itertools.combinations(range(4), r)
               if (np.linalg.lstsq(a[:, list(s)], b, rcond=None)[0] >= 0).all())
    assert np.linalg.norm(a @ x - b) <= best + 1e-9


def test_fit_recovers_known_coefficients() -> None:
    exact = StepCostModel.fit(noisy_samples(synthetic_steps(), noise=0.0))
    np.testing.assert_allclose(exact.coefficients.as_tuple(), TRUE.as_tuple(), rtol=1e-6)


def test_fit_recovers_known_coefficients_from_noisy_samples() -> None:
    model = StepCostModel.fit(noisy_samples(synthetic_steps(), noise=0.02))
    fitted = model.coefficients
    # A prefill's cost per chunk and per step are told apart only by the steps of several chunks:
    # under 2% noise on 50-300 ms steps the 3 ms a chunk is loosely pinned (0.45-1.03x of it over
    # seeds and sizes), what a one-chunk step pays for both closely.
    apart = {"per_prefill_seq_s", "per_prefill_step_s"}
    names = [f.name for f in dataclasses.fields(CostCoefficients) if f.name not in apart]
    np.testing.assert_allclose([getattr(fitted, n) for n in names], [getattr(TRUE, n) for n in names], rtol=0.2)
    assert fitted.per_prefill_seq_s + fitted.per_prefill_step_s == pytest.approx(
        TRUE.per_prefill_seq_s + TRUE.per_prefill_step_s, rel=0.1)
    errors = relative_errors(model, [StepSample(f, true_time(f)) for f in synthetic_steps(seed=7)])
    assert np.mean(np.abs(errors)) < 0.02


def test_fit_never_goes_negative() -> None:
    # Data in which more prefill chunks make a step cheaper: least squares would say per_prefill_seq_s < 0.
    steps = synthetic_steps()
    samples = [StepSample(f, max(1e-3, true_time(f) - 5e-3 * f.num_prefill_seqs)) for f in steps]
    model = StepCostModel.fit(samples)
    assert all(c >= 0 for c in model.coefficients.as_tuple())
    assert model.coefficients.per_prefill_seq_s == 0
    assert all(model.predict_s(f) > 0 for f in synthetic_steps(seed=9))
    assert model.predict_s(StepFeatures()) == 0.0


def test_coefficients_must_be_non_negative() -> None:
    with pytest.raises(ValueError, match="per_prefill_seq_s"):
        CostCoefficients(per_prefill_seq_s=-1e-3)
    with pytest.raises(ValueError, match="at least one sample"):
        StepCostModel.fit([])


# ---- online refinement -------------------------------------------------------------------------

def test_observe_moves_predictions_toward_new_data() -> None:
    model = StepCostModel(TRUE, online=OnlineFitConfig(window_size=128, refit_interval=8))
    slower = CostCoefficients(*(2 * c for c in TRUE.as_tuple()))  # the machine got twice as slow
    decode_steps = [features_of_chunks([(512, 1, True)] * n) for n in (1, 4, 8, 16, 32, 48, 64)]
    probe = features_of_chunks([(300, 1, True)] * 24)
    before = model.predict_s(probe)
    for features in decode_steps * 10:
        model.observe(features, true_time(features, slower))
    after = model.predict_s(probe)
    assert before < after and abs(after - true_time(probe, slower)) < 0.25 * abs(before - true_time(probe, slower))
    # Prefill attention never ran in the observed steps: its coefficient keeps the prior value.
    assert model.coefficients.per_prefill_attention_pair_s == pytest.approx(TRUE.per_prefill_attention_pair_s)
    assert all(c >= 0 for c in model.coefficients.as_tuple())


def test_observe_can_grow_a_coefficient_the_prior_set_to_zero() -> None:
    prior = CostCoefficients(**{**vars(TRUE), "per_scheduled_token_s": 0.0})
    model = StepCostModel(prior, online=OnlineFitConfig(window_size=256, refit_interval=16))
    steps = synthetic_steps(seed=2)
    for sample in noisy_samples(steps, noise=0.0):
        model.observe(sample.features, sample.elapsed_s)
    model.refit()
    assert model.coefficients.per_scheduled_token_s > 0.5 * TRUE.per_scheduled_token_s
    errors = relative_errors(model, [StepSample(f, true_time(f)) for f in synthetic_steps(seed=8)])
    assert np.mean(np.abs(errors)) < 0.03


def test_observe_ignores_empty_steps_and_refits_on_schedule() -> None:
    model = StepCostModel(TRUE, online=OnlineFitConfig(refit_interval=4))
    features = features_of_chunks([(100, 1, True)] * 8)
    for _ in range(3):
        model.observe(features, 1.0)
    model.observe(StepFeatures(), 1.0)
    assert model.coefficients == TRUE  # three real observations: no refit yet
    model.observe(features, 1.0)
    assert model.coefficients != TRUE


# ---- planning and persistence ------------------------------------------------------------------

def test_max_chunk_tokens_is_the_largest_chunk_within_budget() -> None:
    model = StepCostModel(TRUE)
    base = features_of_chunks([(400, 1, True)] * 16)
    budget_s = 0.1
    n = model.max_chunk_tokens(base, num_computed_tokens=128, max_tokens=2048, budget_s=budget_s)
    assert 0 < n < 2048
    assert model.predict_s(base + StepFeatures.of_chunk(128, n, False)) <= budget_s
    assert model.predict_s(base + StepFeatures.of_chunk(128, n + 1, False)) > budget_s
    assert model.max_chunk_tokens(base, 0, 2048, budget_s=model.predict_s(base)) == 0
    assert model.max_chunk_tokens(StepFeatures(), 0, 64, budget_s=10.0) == 64
    # A chunk that completes its prompt also pays for its LM-head row and sample.
    assert model.max_chunk_tokens(base, 128, 2048, budget_s, samples_at=n) < n


ONE_CALL = OneCallSteps(max_rows=32, max_prefill_pairs=4096)


def test_steps_within_the_one_call_bounds_pay_no_per_step_term() -> None:
    """Fitted with the runner's bounds, small chunks beside decodes are priced without
    per_prefill_step_s but with per_one_call_prefill_token_s for their tokens (and the fit recovers
    both from the steps that pay each); the per-step term turns on as a chunk grows past either
    bound, so a chunk's price still grows with its tokens."""
    true = dataclasses.replace(TRUE, per_one_call_prefill_token_s=4e-4)
    steps = synthetic_steps() + [features_of_chunks([(300, 1, True)] * d + [(c, n, False)])
                                 for d in (1, 8, 16) for c, n in ((0, 2), (64, 8), (200, 12))]
    model = StepCostModel.fit([StepSample(f, true_time(f, true, ONE_CALL)) for f in steps], one_call=ONE_CALL)
    np.testing.assert_allclose(model.coefficients.as_tuple(), true.as_tuple(), rtol=1e-6, atol=1e-15)
    small = features_of_chunks([(300, 1, True)] * 16 + [(64, 8, False)])
    assert not model.runs_layer_by_layer(small)
    assert model.predict_s(small) == pytest.approx(true_time(small, true) - true.per_prefill_step_s + 8 * 4e-4)
    base = features_of_chunks([(300, 1, True)] * 16)
    sizes = [model.predict_s(base + StepFeatures.of_chunk(64, n, False)) for n in range(2, 40)]
    assert sizes == sorted(sizes)  # 16 + 16 rows are covered, 16 + 17 are not
    assert model.runs_layer_by_layer(base + StepFeatures.of_chunk(64, 17, False))
    assert model.runs_layer_by_layer(base + StepFeatures.of_chunk(4000, 2, False))  # past the pairs
    assert not StepCostModel(true).predict_s(small) == model.predict_s(small)  # without bounds: every one pays
    loaded = StepCostModel.from_dict(json.loads(json.dumps(model.to_dict())))
    assert loaded.one_call == ONE_CALL and loaded.predict_s(small) == model.predict_s(small)


def test_one_call_chunks_pay_their_pairs_in_the_decode_kernel_apart() -> None:
    """A one-call step's chunk tokens attend row by row in the decode kernel, at a cost per pair
    of its own: the fit tells it from the tokens' cost and from per_prefill_attention_pair_s
    (which layer-by-layer steps pin), so 16 tokens deep in a long prompt are priced at what that
    attention costs there, and a layer-by-layer step's pairs do not pay it."""
    one_call = OneCallSteps(max_rows=64, max_prefill_pairs=24_576)
    true = dataclasses.replace(TRUE, per_one_call_prefill_token_s=4e-4, per_one_call_prefill_pair_s=4e-7)
    steps = synthetic_steps() + [features_of_chunks([(300, 1, True)] * d + [(c, n, False)])
                                 for d in (0, 4, 16) for c, n in ((0, 2), (128, 8), (256, 16), (1024, 16), (1400, 12))]
    model = StepCostModel.fit([StepSample(f, true_time(f, true, one_call)) for f in steps], one_call=one_call)
    np.testing.assert_allclose(model.coefficients.as_tuple(), true.as_tuple(), rtol=1e-6)
    base = features_of_chunks([(300, 1, True)] * 10)
    shallow, deep = (base + StepFeatures.of_chunk(c, 16, False) for c in (256, 1024))
    assert not model.runs_layer_by_layer(deep)
    extra_pairs = deep.num_prefill_attention_pairs - shallow.num_prefill_attention_pairs
    assert model.predict_s(deep) - model.predict_s(shallow) == pytest.approx(
        extra_pairs * (true.per_prefill_attention_pair_s + true.per_one_call_prefill_pair_s))
    past = base + StepFeatures.of_chunk(2000, 16, False)  # 32k pairs: layer by layer, no decode-kernel pairs
    assert model.runs_layer_by_layer(past)
    assert model.predict_s(past) == pytest.approx(true_time(past, dataclasses.replace(true, per_one_call_prefill_pair_s=0.0)))


def test_max_chunk_tokens_looks_past_the_one_call_bounds_where_the_price_falls() -> None:
    """Where a one-call step's chunk tokens cost more than a layer-by-layer step's fixed term, a
    chunk that leaves the bounds is cheaper than one at them: the largest chunk within the budget
    may lie past a gap of chunks that do not fit, and the search still finds it."""
    model = StepCostModel(CostCoefficients(overhead_s=0.010, per_scheduled_token_s=2e-4, per_prefill_step_s=0.005,
                                           per_one_call_prefill_token_s=1e-3), one_call=ONE_CALL)
    base = features_of_chunks([(300, 1, True)] * 16)
    for budget_s in (0.016, 0.025, 0.030, 0.050):
        fitting = [n for n in range(1, 200) if model.predict_s(base + StepFeatures.of_chunk(64, n, False)) <= budget_s]
        assert model.max_chunk_tokens(base, 64, 199, budget_s) == max(fitting, default=0), budget_s
    # At 25 ms the one-call chunks stop fitting at 11 tokens, the layer-by-layer ones fit from 17.
    assert model.max_chunk_tokens(base, 64, 199, 0.025) > 16


def test_a_pruned_prompts_chunk_is_held_to_the_one_call_bounds_by_every_row_its_shallow_layers_run() -> None:
    """A stage-A chunk is priced at ~half its tokens (its shallow layers' share), but those layers
    hold every token, and the runner's one-call bounds test every layer: 40 tokens beside 5
    decodes are 45 rows past a 32-row bound, so the step runs layer by layer and pays
    per_prefill_step_s; under a bound only a one-call step fits, the largest chunk that fits
    keeps the rows within it."""
    plan = PrunePlan.make(1536, 0.3, min_prompt_tokens=64, num_sink_tokens=4, window=8, fractions=(0.5,))
    model = StepCostModel(CostCoefficients(overhead_s=0.008, per_scheduled_token_s=2e-4, per_prefill_step_s=0.010,
                                           per_one_call_prefill_token_s=1e-4), one_call=ONE_CALL)
    decodes = features_of_chunks([(300, 1, True)] * 5)
    chunk = StepFeatures.of_chunk(100, 40, False, plan)
    assert chunk.num_scheduled_tokens == 20 and (decodes + chunk).one_call_counts()[0] == 45
    assert model.runs_layer_by_layer(decodes + chunk)
    assert not model.runs_layer_by_layer(decodes + StepFeatures.of_chunk(100, 27, False, plan))
    budget_s = model.predict_s(decodes + StepFeatures.of_chunk(100, 27, False, plan))
    assert model.max_chunk_tokens(decodes, 100, 512, budget_s, plan=plan) == 27
    # The stage-B step: its deep layers hold every kept row, which the bounds see too.
    final = StepFeatures.of_chunk(1528, 8, True, plan)
    assert final.one_call_counts()[0] == plan.num_kept_prompt_tokens and model.runs_layer_by_layer(final)


def test_json_round_trip() -> None:
    model = StepCostModel.fit(noisy_samples(synthetic_steps(), noise=0.02), description="synthetic")
    loaded = StepCostModel.from_dict(json.loads(json.dumps(model.to_dict())))
    assert loaded.coefficients == model.coefficients and loaded.description == "synthetic"
    for features in synthetic_steps(seed=5)[:20]:
        assert loaded.predict_s(features) == model.predict_s(features)
    with pytest.raises(ValueError, match="format_version"):
        StepCostModel.from_dict({"coefficients": {}})
    with pytest.raises(ValueError, match="unknown"):
        StepCostModel.from_dict({"format_version": 1, "coefficients": {"per_layer_s": 1.0}})


def test_mixed_step_ratio_follows_how_far_mixed_steps_overrun_the_fit():
    model = StepCostModel(CostCoefficients(overhead_s=0.010, per_scheduled_token_s=0.001))
    mixed = features_of_chunks([(100, 1, True), (0, 64, False)])
    decode = features_of_chunks([(100, 1, True)])
    for _ in range(200):
        model.observe(mixed, 1.2 * model.predict_s(mixed))
        model.observe(decode, 0.5 * model.predict_s(decode))  # decode-only steps do not move it
    assert model.mixed_step_ratio == pytest.approx(1.2, rel=0.05)


def test_mixed_step_excess_is_the_overrun_in_seconds_within_the_ratio_bounds():
    model = StepCostModel(CostCoefficients(overhead_s=0.010, per_scheduled_token_s=0.001),
                          online=OnlineFitConfig(refit_interval=10**9))  # the fit held still
    small = features_of_chunks([(100, 1, True), (0, 16, False)])  # 27 ms predicted
    large = features_of_chunks([(100, 1, True), (0, 496, False)])  # 507 ms predicted
    for _ in range(200):  # the same 5 ms over, small chunk or large: a ratio would differ 1.19 / 1.01
        model.observe(small, model.predict_s(small) + 0.005)
        model.observe(large, model.predict_s(large) + 0.005)
    assert model.mixed_step_excess_s == pytest.approx(0.005, rel=0.05)
    for _ in range(200):  # a stall 10x the step counts as at most MIXED_RATIO_BOUNDS' 1.5x
        model.observe(small, 10 * model.predict_s(small))
    assert model.mixed_step_excess_s == pytest.approx(0.5 * model.predict_s(small), rel=0.05)
