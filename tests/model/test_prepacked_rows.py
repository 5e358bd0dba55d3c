"""Prepacked linears run at bucketed row counts (engine/model/layers/linear.py, packed_rows_bucket):
oneDNN compiles a kernel per (rows, weight shape), so rows are padded up to a few shapes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import engine.model.layers.linear as linear
from engine import SamplingParams
from engine.model.compute_plan import ComputePlan, _can_prepack_bf16
from engine.model.layers.linear import PACKED_BUCKETS_PER_OCTAVE, PACKED_EXACT_ROWS, Linear, packed_rows_bucket

needs_prepack = pytest.mark.skipif(not _can_prepack_bf16(),
                                   reason="oneDNN cannot prepack bf16 on this CPU (or under this mask)")


def test_row_buckets_bound_the_shapes_and_the_padding() -> None:
    for rows in range(1, 4097):
        bucket = packed_rows_bucket(rows)
        assert bucket >= rows and packed_rows_bucket(bucket) == bucket
        if rows <= PACKED_EXACT_ROWS:
            assert bucket == rows  # decode steps: no padding
        elif rows >= 256:
            assert bucket - rows < rows / 16
        else:
            assert bucket - rows < PACKED_EXACT_ROWS
    for power in range(4, 12):  # (16, 32], ..., (2048, 4096]
        octave = range((1 << power) + 1, (1 << (power + 1)) + 1)
        assert len({packed_rows_bucket(rows) for rows in octave}) <= PACKED_BUCKETS_PER_OCTAVE


@needs_prepack
def test_prepacked_linear_runs_its_bucket_and_returns_each_rows_own_output(monkeypatch: pytest.MonkeyPatch) -> None:
    plan = ComputePlan(device=torch.device("cpu"), dtype=torch.bfloat16, weight_format="dequantized",
                       native_ops=False, prepack_bf16=True)
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(1000, 576, generator=generator).to(torch.bfloat16)
    layer = Linear(576, 1000, True, plan)
    layer.load(weight)
    layer.bias.data.copy_(torch.randn(1000, generator=generator))
    assert layer.packed is not None
    called_with = []
    onednn = linear._onednn_linear
    monkeypatch.setattr(linear, "_onednn_linear", lambda x, packed, bias: called_with.append(x.shape[0]) or onednn(x, packed, bias))
    row_counts = (1, 16, 17, 100, 230, 520)
    for rows in row_counts:
        x = torch.randn(rows, 576, generator=generator).to(torch.bfloat16)
        out = layer(x)
        assert out.shape == (rows, 1000)
        reference = F.linear(x.float(), weight.float(), layer.bias.float())
        torch.testing.assert_close(out.float(), reference, atol=0.25, rtol=2e-2)  # bf16 output
    assert called_with == [packed_rows_bucket(rows) for rows in row_counts]
    assert called_with[3:] == [112, 240, 544]


@needs_prepack
def test_padding_a_prefill_to_its_bucket_leaves_the_prompts_scores(llm_bf16, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real model, prepacked bf16: a prompt of 100 tokens prefills in one step of 100 rows, run
    at 112; its prompt logprobs match those of the same prefill at exactly 100 rows."""
    prompt = llm_bf16.get_tokenizer().encode("The history of the printing press begins " * 12)[:100]
    assert packed_rows_bucket(len(prompt)) != len(prompt)
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)

    def scores() -> torch.Tensor:
        output = llm_bf16.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]
        return torch.tensor([next(iter(entry.values())).logprob for entry in output.prompt_logprobs[1:]])

    bucketed = scores()
    monkeypatch.setattr(linear, "PACKED_EXACT_ROWS", 1 << 30)
    exact = scores()
    assert bucketed.shape == (len(prompt) - 1,)
    torch.testing.assert_close(bucketed, exact, atol=0.05, rtol=0.0)
