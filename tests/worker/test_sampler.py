"""The sampler on hand-made logits: each filter keeps exactly the tokens it should."""

from __future__ import annotations

import pytest
import torch

from engine.sampling_params import SamplingParams
from engine.worker.sampler import Sampler, SamplingRow, apply_penalties, filtered_probs, row_maxima


def row(params: SamplingParams, output_ids=(), seed=None) -> SamplingRow:
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return SamplingRow(params, [1, 2], list(output_ids), frozenset({0}), generator)


LOGITS = torch.log(torch.tensor([[0.05, 0.1, 0.15, 0.3, 0.4]]))


def test_greedy_takes_the_argmax():
    assert Sampler()(LOGITS, [row(SamplingParams(temperature=0.0))])[0].token_id == 4


def test_top_k_keeps_the_k_most_likely():
    probs = filtered_probs(LOGITS, [SamplingParams(top_k=2)])
    assert (probs[0] > 0).tolist() == [False, False, False, True, True]
    assert torch.allclose(probs[0, 3:], torch.tensor([0.3 / 0.7, 0.4 / 0.7]))


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    probs = filtered_probs(LOGITS, [SamplingParams(top_p=0.6)])  # 0.4 + 0.3 >= 0.6
    assert (probs[0] > 0).tolist() == [False, False, False, True, True]
    probs = filtered_probs(LOGITS, [SamplingParams(top_p=0.4)])
    assert (probs[0] > 0).tolist() == [False, False, False, False, True]


def test_min_p_drops_tokens_below_a_fraction_of_the_best():
    probs = filtered_probs(LOGITS, [SamplingParams(min_p=0.5)])  # keep p >= 0.2
    assert (probs[0] > 0).tolist() == [False, False, False, True, True]


def test_temperature_sharpens():
    cold = filtered_probs(LOGITS, [SamplingParams(temperature=0.5)])
    assert cold[0, 4] > 0.4 and torch.isclose(cold.sum(), torch.tensor(1.0))


def test_seeded_draws_follow_the_distribution_and_repeat():
    sampler = Sampler()
    params = SamplingParams(temperature=1.0, seed=3)
    draws = [sampler(LOGITS, [row(params, seed=s)])[0].token_id for s in range(2000)]
    freq = torch.bincount(torch.tensor(draws), minlength=5).float() / len(draws)
    assert torch.allclose(freq, LOGITS.exp()[0], atol=0.04)
    again = [sampler(LOGITS, [row(params, seed=s)])[0].token_id for s in range(50)]
    assert again == draws[:50]


def test_min_tokens_masks_stop_ids():
    logits = torch.tensor([[5.0, 1.0, 0.0]])
    params = SamplingParams(temperature=0.0, min_tokens=2)
    assert Sampler()(logits, [row(params, output_ids=[1])])[0].token_id == 1  # eos (0) masked
    assert Sampler()(logits, [row(params, output_ids=[1, 1])])[0].token_id == 0


def test_penalties_follow_vllm_semantics():
    logits = torch.tensor([2.0, -2.0, 2.0, 1.0])
    apply_penalties(logits, SamplingParams(repetition_penalty=2.0), prompt_token_ids=[0], output_token_ids=[1])
    assert logits.tolist() == [1.0, -4.0, 2.0, 1.0]
    logits = torch.tensor([0.0, 0.0, 0.0])
    apply_penalties(logits, SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), [], [1, 1, 2])
    assert logits.tolist() == [0.0, -1.0, -0.75]


@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.0])
def test_a_tiny_repetition_penalty_picks_a_seen_token_and_stays_finite(temperature: float):
    # 5.7e-121 divides a seen positive logit past float32's range: the row stays finite (no
    # nonfinite_logits failure) and a seen token wins, as the penalty's limit says.
    logits = torch.tensor([[3.0, 0.5, -1.0, 2.0, 4.0]])
    params = SamplingParams(temperature=temperature, repetition_penalty=5.68e-121, seed=0)
    sampled = Sampler()(logits, [row(params, seed=0)])[0]  # row(): prompt [1, 2] seen
    assert sampled.logits_finite and sampled.token_id == 1


def test_logprobs_report_rank_and_top_alternatives():
    params = SamplingParams(temperature=0.0, logprobs=2)
    sampled = Sampler()(LOGITS, [row(params)])[0]
    assert sampled.token_id == 4 and sampled.rank == 1
    assert sampled.top_token_ids == [4, 3]
    assert abs(sampled.logprob - torch.log(torch.tensor(0.4)).item()) < 1e-5


@pytest.mark.parametrize("columns", [49152, 32000, 151936, 3000, 2048, 1500, 100])
def test_row_maxima_is_max_along_rows(columns: int):
    """The chunked maximum gives torch.max(dim=-1)'s values and first-maximum indices: on ties
    within and across chunks, in the last and shorter chunk, on rows all -inf and rows with NaN."""
    generator = torch.Generator().manual_seed(columns)
    x = torch.randn(12, columns, generator=generator)
    x[1] = 1.0                                       # every column ties
    x[2, -1] = 100.0                                 # the maximum in the last column
    x[3, 5] = float("nan")                           # NaN wins, as in max
    x[4] = float("-inf")                             # every token masked
    x[5, columns // 2] = x[5, columns - 1] = 50.0    # a tie across chunks: the first
    x[6, min(1024, columns - 1):] = 99.0             # ties over a whole later chunk
    x[7, 0] = x[7, 1] = 60.0                         # a tie inside the first chunk
    maxima, indices = row_maxima(x)
    expected = x.max(dim=-1)
    assert torch.equal(indices, expected.indices)
    assert torch.equal(maxima.nan_to_num(7.0), expected.values.nan_to_num(7.0))
    assert torch.isnan(maxima[3]) and maxima[4] == float("-inf")
    strided = x.t().contiguous().t()  # the same values, rows not contiguous
    assert not strided.is_contiguous() and torch.equal(row_maxima(strided)[1], expected.indices)


def test_a_temperature_that_float32_rounds_to_zero_samples_greedily():
    params = SamplingParams(temperature=1e-50)
    assert params.is_greedy
    sampled = Sampler()(LOGITS, [row(params)])[0]
    assert sampled.logits_finite and sampled.token_id == 4
