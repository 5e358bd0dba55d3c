"""The SLO policy's choice of elastic settings (engine/scheduler/elastic_choice.py), its knob costs
(engine/scheduler/knob_costs.py) and the quality table it ranks by (engine/elastic/quality_table.py)."""

from __future__ import annotations

import pytest

from engine.elastic.checkpoint import ADAPTERS_FILE
from engine.elastic.quality_table import DEFAULT_QUALITY, DEFAULT_QUALITY_DISTILLED, QualityTable, load_quality_table
from engine.scheduler.elastic_choice import CLIMB_MARGIN, ElasticChoice
from engine.scheduler.knob_costs import KnobCosts, StepLevels

LEVELS = (100, 90, 70, 40)
DECODE = {100: 1.0, 90: 0.95, 70: 0.85, 40: 0.7}
PREFILL = {100: 1.0, 90: 0.9, 70: 0.75, 40: 0.55}


def choice() -> ElasticChoice:
    return ElasticChoice(KnobCosts(LEVELS, dict(DECODE), dict(PREFILL), (0.2, 0.3)), DEFAULT_QUALITY)


def test_light_load_keeps_the_full_model() -> None:
    c = choice()
    assert c.choose_level(0.0, 0.0) == 100 and c.choose_level(0.99, 0.5) == 100


@pytest.mark.parametrize("decode, ttft, expected", [
    (1.02, 0.0, 90),   # decode pressure just over: the widest level that fits
    (1.10, 0.0, 70),   # 0.95 x 1.10 > 1, 0.85 x 1.10 <= 1
    (0.0, 1.5, 40),    # prefill pressure: prefill fractions (0.75 x 1.5 > 1)
    (1.2, 1.2, 40),    # both must fit: at 70 the prefill would (0.9) but the decode would not (1.02)
    (5.0, 0.0, 40),    # nothing fits: the narrowest
])
def test_level_falls_to_the_widest_that_fits(decode: float, ttft: float, expected: int) -> None:
    c = choice()
    chosen = c.choose_level(decode, ttft)
    assert chosen == expected
    load = max(decode * DECODE[chosen], ttft * PREFILL[chosen])
    wider = LEVELS[:LEVELS.index(chosen)]
    assert load <= 1.0 or chosen == LEVELS[-1]
    assert all(max(decode * DECODE[w], ttft * PREFILL[w]) > 1.0 for w in wider)


def test_a_load_the_full_model_cannot_serve_lowers_the_level_as_prefill_pressure_does() -> None:
    assert choice().choose_level(0.0, 0.0, load_pressure=1.2) == 70  # 0.75 x 1.2 <= 1 < 0.9 x 1.2
    assert choice().choose_level(0.0, 0.0, load_pressure=0.95) == 100


def test_level_climbs_back_one_level_a_step_with_margin() -> None:
    c = choice()
    assert c.choose_level(1.5, 0.0) == 40
    # Load gone: one level back a step, never straight to the top.
    assert [c.choose_level(0.0, 0.0) for _ in range(4)] == [70, 90, 100, 100]
    c.choose_level(1.5, 0.0)
    # At a pressure that puts the next wider level (70) at 0.94 of its allowance it would fit,
    # but climbing needs its load <= CLIMB_MARGIN: the level stays at 40.
    pressure = 0.94 / DECODE[70]
    assert DECODE[70] * pressure > CLIMB_MARGIN
    assert c.choose_level(pressure, 0.0) == 40


def test_a_prompts_ttft_pressure_lowers_the_prompts_level_and_not_the_decodes() -> None:
    c = choice()
    assert c.choose_level(0.0, 1.5) == 40 and c.decode_level == 100
    assert c.level_for(None) == 40 and c.level_for(None, decoding=True) == 100
    # Decode pressure and the load take the decodes down, as they do the prompts.
    c = choice()
    assert c.choose_level(1.10, 0.0) == 70 and c.decode_level == 70
    c = choice()
    assert c.choose_level(0.0, 0.0, load_pressure=1.2) == 70 and c.decode_level == 70  # 0.85 x 1.2 > 1
    # Both pressures: the prompts fall as far as either asks, the decodes as far as theirs does.
    c = choice()
    assert c.choose_level(1.02, 1.5) == 40 and c.decode_level == 90


def test_past_a_load_the_full_model_serves_the_decodes_fall_with_the_prompts() -> None:
    c = choice()
    assert c.choose_level(0.0, 1.5, whole_prompt_load=1.0) == 40 and c.decode_level == 100
    assert c.choose_level(0.0, 1.5, whole_prompt_load=1.1) == 40 and c.decode_level == 40
    # The load back under: the decodes climb from where they are, one level a step.
    assert c.choose_level(0.0, 1.5, whole_prompt_load=0.5) == 40 and c.decode_level == 70


def test_the_decodes_level_climbs_back_as_the_prompts_does_and_is_never_narrower() -> None:
    c = choice()
    c.choose_level(1.5, 0.0)
    assert (c.level, c.decode_level) == (40, 40)
    climbed = [(c.choose_level(0.0, 0.0), c.decode_level) for _ in range(4)]
    assert climbed == [(70, 70), (90, 90), (100, 100), (100, 100)]
    c.choose_level(0.0, 1.5)
    # The prompts' pressure gone, they climb one level a step; the decodes never left 100.
    assert [(c.choose_level(0.0, 0.0), c.decode_level) for _ in range(3)] == [(70, 100), (90, 100), (100, 100)]


def test_floor_caps_how_far_a_request_falls() -> None:
    c = choice()
    c.choose_level(5.0, 0.0)
    assert c.level == 40
    assert c.level_for(None) == 40 and c.level_for(70) == 70 and c.lowest_level(90) == 90


def test_keep_is_the_largest_that_fits_above_the_floor() -> None:
    c = choice()
    assert c.choose_keep(lambda keep: True, None) == (1.0, True)
    assert c.choose_keep(lambda keep: keep <= 0.5, None) == (0.5, True)
    assert c.choose_keep(lambda keep: keep <= 0.3, 0.5) == (0.5, False)  # the floor wins: best effort
    assert c.choose_keep(lambda keep: False, None) == (0.3, False)


def test_keep_fraction_follows_the_prune_layers() -> None:
    costs = KnobCosts(LEVELS, dict(DECODE), dict(PREFILL), (0.2, 0.3))  # layers below l_1: 50%
    assert costs.keep_fraction(1.0) == 1.0
    assert costs.keep_fraction(0.25) == pytest.approx(0.5 + 0.2 * 0.5 + 0.3 * 0.25)
    assert KnobCosts.unmeasured(LEVELS).keep_fraction(0.3) == 1.0  # pruning off


def test_observed_steps_move_their_levels_fraction() -> None:
    costs = KnobCosts(LEVELS, dict(DECODE), dict(PREFILL))
    for _ in range(200):
        costs.observe(40, True, predicted_full_s=0.040, elapsed_s=0.024)
    assert costs.fraction(40, True) == pytest.approx(0.6, abs=0.01)
    assert costs.fraction(40, False) == PREFILL[40] and costs.fraction(70, True) == DECODE[70]
    with pytest.raises(ValueError):
        KnobCosts(LEVELS, {100: 1.0}, dict(PREFILL))


def test_a_step_whose_chunks_and_decodes_run_at_different_levels_is_priced_in_two_parts() -> None:
    """Decodes at 70 beside a chunk at 40: the decodes' share of the full model's prediction at
    70's decode fraction, the rest at 40's prefill fraction; one level: the whole at its own."""
    costs = KnobCosts(LEVELS, dict(DECODE), dict(PREFILL))
    mixed = StepLevels(decode=70, chunk=40)
    assert mixed.is_mixed and mixed.widest == 70 and not StepLevels(40, 40).is_mixed
    assert costs.priced_s(0.2, 0.05, mixed) == pytest.approx(0.05 * DECODE[70] + 0.15 * PREFILL[40])
    assert costs.priced_s(0.2, 0.05, StepLevels(70, 70)) == pytest.approx(0.2 * PREFILL[70])
    assert costs.priced_s(0.2, 0.2, StepLevels(70, None)) == pytest.approx(0.2 * DECODE[70])
    assert costs.priced_s(0.2, 0.0, StepLevels(None, 40)) == pytest.approx(0.2 * PREFILL[40])
    # full_budget_s inverts it: the largest full-model prediction priced within the bound.
    for levels in (mixed, StepLevels(70, 70), StepLevels(70, None), StepLevels(100, 40)):
        budget = costs.full_budget_s(0.1, 0.05, levels)
        assert costs.priced_s(budget, 0.05, levels) == pytest.approx(0.1)
    # A chunk at 40 beside decodes at 70 fits more than the same step priced whole at 70.
    assert costs.full_budget_s(0.1, 0.05, mixed) > 0.1 / PREFILL[70]


def test_a_mixed_step_teaches_its_chunks_level_what_its_decodes_leave() -> None:
    costs = KnobCosts(LEVELS, dict(DECODE), dict(PREFILL))
    for _ in range(300):  # decodes predicted at 20 ms of 100, chunks ran at 0.5 of the full model
        costs.observe_step(StepLevels(70, 40), 0.100, 0.020, 0.020 * DECODE[70] + 0.080 * 0.5)
    assert costs.fraction(40, False) == pytest.approx(0.5, abs=0.01)
    assert costs.fraction(70, False) == PREFILL[70] and costs.fraction(70, True) == DECODE[70]
    before = dict(costs.prefill_fraction)
    costs.observe_step(StepLevels(70, 40), 0.100, 0.060, 0.5)  # mostly decodes: says too little
    costs.observe_step(StepLevels(70, 100), 0.100, 0.010, 0.5)  # full-level chunks: the cost model's
    costs.observe_step(StepLevels(70, 40), 0.100, 0.020, 0.001)  # its decodes alone overran it
    assert costs.prefill_fraction == before
    costs.observe_step(StepLevels(40, 40), 0.100, 0.0, 0.1)  # one level: as observe
    assert costs.fraction(40, False) > 0.5


def test_a_levels_prefill_saves_more_of_a_prompt_that_is_more_attention() -> None:
    """Level 40 attends with a third of the heads (attention 1/3) and runs 0.55 of the rest: a
    long prompt, half attention, costs (0.55 + 0.33) / 2 of the full model's; its observed steps
    move only the rest's fraction, and a step as predicted moves nothing."""
    costs = KnobCosts(LEVELS, dict(DECODE), dict(PREFILL), attention_fraction={40: 1 / 3})
    assert costs.fraction(40, False) == PREFILL[40]
    assert costs.fraction(40, False, attention_share=0.5) == pytest.approx((0.55 + 1 / 3) / 2)
    assert costs.fraction(70, False, attention_share=0.5) == PREFILL[70]  # no attention fraction: as the rest
    assert costs.fraction(40, True, attention_share=0.5) == DECODE[40]
    costs.observe(40, False, predicted_full_s=1.0, elapsed_s=(0.55 + 1 / 3) / 2, attention_share=0.5)
    assert costs.prefill_fraction[40] == pytest.approx(0.55)
    for _ in range(200):  # the rest ran at 0.45: seen through steps of every attention share
        for share in (0.1, 0.5):
            costs.observe(40, False, 1.0, 0.45 * (1 - share) + share / 3, attention_share=share)
    assert costs.prefill_fraction[40] == pytest.approx(0.45, abs=0.01)
    with pytest.raises(ValueError):
        KnobCosts(LEVELS, dict(DECODE), dict(PREFILL), attention_fraction={40: 1.5})


def test_attention_heavy_prefill_pressure_is_met_at_a_wider_level() -> None:
    """A level that attends with fewer heads relieves a long prompt's pressure more than its
    plain prefill fraction says: 1.5 x 0.75 > 1 at 70 alone, but half of it attention at 1/3."""
    costs = KnobCosts(LEVELS, dict(DECODE), dict(PREFILL), attention_fraction={100: 1.0, 90: 1.0, 70: 1 / 3, 40: 1 / 3})
    assert ElasticChoice(costs, DEFAULT_QUALITY).choose_level(0.0, 1.5) == 40
    assert ElasticChoice(costs, DEFAULT_QUALITY).choose_level(0.0, 1.5, attention_share=0.5) == 70


def test_quality_table_orders_settings_and_round_trips(tmp_path) -> None:
    table = DEFAULT_QUALITY
    qualities = [table.level_quality(level) for level in (100, 90, 80, 70, 55, 40)]
    assert qualities == sorted(qualities, reverse=True) and qualities[0] == 1.0
    assert table.level_quality(85) == pytest.approx(1 / ((table.perplexity_ratio[80] + table.perplexity_ratio[90]) / 2))
    assert load_quality_table(tmp_path) is DEFAULT_QUALITY and load_quality_table(None) is DEFAULT_QUALITY
    (tmp_path / ADAPTERS_FILE).write_bytes(b"")  # distilled adapters beside the checkpoint: their figures
    assert load_quality_table(tmp_path) is DEFAULT_QUALITY_DISTILLED
    assert all(DEFAULT_QUALITY_DISTILLED.level_quality(level) > DEFAULT_QUALITY.level_quality(level)
               for level in (90, 80, 70, 55, 40))
    measured = QualityTable({100: 1.0, 50: 2.0}, {1.0: 1.0, 0.5: 0.8}, "test")
    measured.save(tmp_path)
    loaded = load_quality_table(tmp_path)
    assert loaded == measured and loaded.quality(50, 0.5) == pytest.approx(0.4)
    with pytest.raises(ValueError):
        QualityTable({100: 0.5}, {1.0: 1.0}, "a cut model better than the full one")
