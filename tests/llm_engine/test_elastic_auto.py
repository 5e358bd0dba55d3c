"""Settings left to the server (issue #15): the slo policy runs "auto" requests on the real model at
the full level and whole prompt under light load, lowers the level when TPOT targets would be
missed and prunes a long prompt whose TTFT target needs it, never below the request's floors."""

from __future__ import annotations

import pytest

from engine import LLM, SamplingParams
from engine.config import SLOConfig
from engine.llm_engine import InvalidRequestError
from engine.request import SLOTarget
from engine.scheduler.cost_model import features_of_chunks

from tests.conftest import assert_kv_empty

PROMPT = "Write a short story about a dragon who learns to bake bread. " * 6


@pytest.fixture(scope="module")
def slo_llm() -> LLM:
    return LLM(scheduling_policy="slo", max_num_seqs=16, kv_cache_memory=0.5, slo=SLOConfig(best_effort=True))


def run(llm: LLM) -> dict[str, set[int]]:
    """Step to the end; each request's levels over the steps it ran in."""
    engine, levels = llm.engine, {}
    while engine.has_unfinished_requests():
        engine.step()
        for request in engine.scheduler.running:
            levels.setdefault(request.request_id, set()).add(request.elastic_level)
    return levels


def test_light_load_runs_the_full_model_on_the_whole_prompt(slo_llm: LLM) -> None:
    engine = slo_llm.engine
    engine.add_request("light", PROMPT, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True),
                       slo=SLOTarget(ttft_s=30.0, tpot_s=2.0), elastic_level="auto", prompt_keep="auto")
    [request] = engine.scheduler.waiting
    assert request.elastic_auto and request.prompt_keep == 1.0 and request.prune_plan is None
    assert run(slo_llm) == {"light": {100}}
    assert_kv_empty(slo_llm)


def test_a_prompts_tight_ttft_lowers_its_own_level_and_not_the_decodes_beside_it(slo_llm: LLM) -> None:
    """The document's TTFT target needs a narrower level than the full model's; the chat
    decoding beside it has no TPOT target and stays at level 100 throughout (before the decodes
    had a level of their own, they fell with the document's pressure).  Without a TPOT target
    running, a prefill runs in whole-budget chunks, so the document's TTFT pressure is its
    predicted prefill (calibrated) over its target: 1.25."""
    engine = slo_llm.engine
    engine.add_request("chat", PROMPT, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True),
                       slo=SLOTarget(ttft_s=60.0), elastic_level="auto")
    while not engine.scheduler.running or engine.scheduler.running[0].num_output_tokens < 2:
        engine.step()  # two tokens: the step after the first has learnt from it (first_token_ratio)
    tokens = slo_llm.get_tokenizer().encode(PROMPT * 12)[:1500]
    policy = engine.scheduler.policy
    whole_s = policy.first_token_ratio * policy.prefill_time_s(len(tokens))  # as admission predicts it
    engine.add_request("document", tokens, SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True),
                       slo=SLOTarget(ttft_s=0.8 * whole_s), elastic_level="auto")
    levels = run(slo_llm)
    assert min(levels["document"]) < 100
    assert levels["chat"] == {100}
    assert_kv_empty(slo_llm)


def test_tight_tpot_lowers_auto_levels_and_spares_fixed_ones(slo_llm: LLM) -> None:
    engine = slo_llm.engine
    num_seqs = 8
    # A target the full model's decode step (as the policy predicts it) just misses.
    full_step_s = engine.cost_model.predict_s(features_of_chunks([(60, 1, True)] * num_seqs))
    slo = SLOTarget(ttft_s=60.0, tpot_s=full_step_s * 0.95)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    for i in range(num_seqs - 2):
        engine.add_request(f"auto-{i}", PROMPT, params, slo=slo, elastic_level="auto")
    engine.add_request("floor", PROMPT, params, slo=slo, elastic_level="auto", min_level=80)
    engine.add_request("fixed", PROMPT, params, slo=slo, elastic_level=100)
    levels = run(slo_llm)
    assert all(min(levels[f"auto-{i}"]) < 100 for i in range(num_seqs - 2))
    assert min(levels["floor"]) == 80 and levels["fixed"] == {100}
    assert_kv_empty(slo_llm)


def test_tight_ttft_prunes_a_long_prompt(slo_llm: LLM) -> None:
    engine = slo_llm.engine
    tokens = slo_llm.get_tokenizer().encode(PROMPT * 12)[:1500]
    policy = engine.scheduler.policy
    whole_s = policy.first_token_ratio * policy.prefill_time_s(len(tokens))  # as admission predicts it
    params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    engine.add_request("loose", tokens, params, slo=SLOTarget(ttft_s=50 * whole_s), prompt_keep="auto")
    engine.add_request("tight", tokens, params, slo=SLOTarget(ttft_s=0.9 * whole_s), prompt_keep="auto")
    engine.add_request("floored", tokens, params, slo=SLOTarget(ttft_s=0.9 * whole_s), prompt_keep="auto",
                       min_prompt_keep=1.0)
    keeps = {r.request_id: r.prompt_keep for r in engine.scheduler.waiting}
    assert keeps == {"loose": 1.0, "tight": keeps["tight"], "floored": 1.0} and keeps["tight"] < 1.0
    outputs = {}
    while engine.has_unfinished_requests():
        outputs.update({o.request_id: o for o in engine.step() if o.finished})
    assert outputs["tight"].prompt_keep == keeps["tight"]
    assert outputs["tight"].num_prompt_tokens_computed_in_full < len(tokens)
    assert outputs["loose"].num_prompt_tokens_computed_in_full == len(tokens)
    assert_kv_empty(slo_llm)


@pytest.mark.parametrize("kwargs, field", [
    ({"elastic_level": "fast"}, "elastic.level"),
    ({"elastic_level": "auto", "min_level": 33}, "elastic.min_level"),
    ({"prompt_keep": "auto", "min_prompt_keep": 0.0}, "elastic.min_prompt_keep"),
    ({"prompt_keep": "most"}, "elastic.prompt_keep"),
])
def test_bad_settings_name_their_field(slo_llm: LLM, kwargs: dict, field: str) -> None:
    with pytest.raises(InvalidRequestError) as error:
        slo_llm.engine.add_request("bad", PROMPT, SamplingParams(max_tokens=2), **kwargs)
    assert error.value.param == field
    assert not slo_llm.engine.has_unfinished_requests()


def test_levels_that_keep_fewer_heads_price_a_prefills_attention_by_them(slo_llm: LLM) -> None:
    """The CPU backends attend with a prefill chunk's level's heads only, so the knob costs scale a
    level's prefill attention by the heads it keeps (the elastic spec's), apart from the rest: a
    long prompt at the lowest level is priced below a short one."""
    engine = slo_llm.engine
    spec, costs = engine.runner.elastic_spec, engine.knob_costs
    assert costs.attention_fraction == {level: spec.head_fraction(level) for level in spec.level_values}
    lowest = spec.level_values[-1]
    assert costs.attention_fraction[spec.level_values[0]] == 1.0 and costs.attention_fraction[lowest] < 0.5
    short, long = (engine.cost_model.attention_share(features_of_chunks([(0, n, True)])) for n in (64, 1536))
    assert short < long
    assert costs.fraction(lowest, False, long) < costs.fraction(lowest, False, short)
