"""Elastic submodels end to end on the real model (its elastic checkpoint, built on first use and
cached): the full level of the reordered model is the original model; a batch that mixes levels
gives every request what it gets alone; levels switch without copying weights; bad levels are
refused; KV written at one level is never reused by another."""

from __future__ import annotations

import pytest
import torch

from engine import SamplingParams
from engine.llm_engine import InvalidRequestError
from tests.conftest import assert_kv_empty, make_llm

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "List three uses of copper:", "The quick brown fox"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=5)


@pytest.fixture(scope="module")
def elastic_fp32():
    return make_llm(dtype="float32", weight_format="dequantized", elastic="on", kv_cache_memory=0.5,
                    max_num_batched_tokens=64)


@pytest.fixture(scope="module")
def plain_fp32():
    return make_llm(dtype="float32", weight_format="dequantized", elastic="off", kv_cache_memory=0.5,
                    max_num_batched_tokens=64)


@pytest.fixture(scope="module")
def elastic_native():
    return make_llm(dtype="float32", weight_format="native", elastic="on", kv_cache_memory=0.5,
                    max_num_batched_tokens=64)


def test_full_level_equals_the_original_model(elastic_fp32, plain_fp32) -> None:
    """Level 100 of the reordered model: the same greedy tokens and top-5 logprobs within 1e-4."""
    got = elastic_fp32.generate(PROMPTS, GREEDY, use_tqdm=False, elastic_level=100)
    want = plain_fp32.generate(PROMPTS, GREEDY, use_tqdm=False)
    for g, w in zip(got, want):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        for g_step, w_step in zip(g.outputs[0].logprobs, w.outputs[0].logprobs):
            assert g_step.keys() == w_step.keys()
            for token_id, logprob in w_step.items():
                assert abs(g_step[token_id].logprob - logprob.logprob) < 1e-4
        assert g.elastic_level == 100
    assert_kv_empty(elastic_fp32)


def test_native_blocks_run_the_reordered_model_from_the_files_bytes(elastic_native, elastic_fp32) -> None:
    """The down projections' neurons move inside Q4_1 blocks: they keep the file's blocks (gathering
    their inputs), so native is the dequantized elastic model, at the file's 5 bits a weight."""
    downs = [layer.feed_forward.w2 for layer in elastic_native.engine.runner.model.layers]
    assert all(w2.quantized is not None for w2 in downs)
    assert any(w2.quantized_input_order is not None for w2 in downs)
    got = elastic_native.generate(PROMPTS, GREEDY, use_tqdm=False, elastic_level=100)
    want = elastic_fp32.generate(PROMPTS, GREEDY, use_tqdm=False, elastic_level=100)
    agree = sum(g.outputs[0].token_ids == w.outputs[0].token_ids for g, w in zip(got, want))
    assert agree >= len(PROMPTS) - 1
    assert_kv_empty(elastic_native)


@pytest.mark.parametrize("weight_format", ["dequantized", "native"])
def test_mixed_levels_give_each_request_its_tokens_alone(weight_format: str, elastic_fp32, elastic_native) -> None:
    llm = elastic_fp32 if weight_format == "dequantized" else elastic_native
    levels = list(llm.engine.elastic_levels)
    assert len(levels) >= 4 and levels[0] == 100
    per_prompt = [levels[i % len(levels)] for i in range(len(PROMPTS))][::-1]  # rows out of level order
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    mixed = llm.generate(PROMPTS, params, use_tqdm=False, elastic_level=per_prompt)
    for prompt, level, output in zip(PROMPTS, per_prompt, mixed):
        alone = llm.generate(prompt, params, use_tqdm=False, elastic_level=level)[0]
        assert output.outputs[0].token_ids == alone.outputs[0].token_ids, f"level {level}"
        assert output.elastic_level == level
    smallest = llm.generate(PROMPTS[0], params, use_tqdm=False, elastic_level=levels[-1])[0]
    full = llm.generate(PROMPTS[0], params, use_tqdm=False, elastic_level=100)[0]
    assert smallest.outputs[0].token_ids != full.outputs[0].token_ids, "the smallest level should differ"
    assert_kv_empty(llm)


def test_switching_levels_copies_no_weights(elastic_fp32) -> None:
    """A step mixing every level reads views of the weights: no op copies a weight-shaped tensor,
    and resident weight memory is what it was."""
    engine = elastic_fp32.engine
    before = engine.runner.weights_bytes
    levels = list(engine.elastic_levels)
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    for i, level in enumerate(levels):  # 5 decode rows, a number no weight dimension has
        engine.add_request(f"switch-{i}", PROMPTS[i % len(PROMPTS)], params, elastic_level=level)
    engine.step()  # the prefills
    arch = engine.runner.model.config
    weight_dims = {arch.hidden_size, arch.intermediate_size, 2 * arch.intermediate_size, arch.vocab_size,
                   arch.num_heads * arch.head_dim + 2 * arch.num_kv_heads * arch.head_dim}
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        engine.step()  # one decode step, rows at every level
    copies = [(e.name, e.input_shapes) for e in prof.events() if e.name in ("aten::copy_", "aten::clone",
                                                                            "aten::contiguous")]
    weight_copies = [c for c in copies if any(len(shape) == 2 and shape[0] > len(levels) and shape[1] > 1
                                              and (shape[0] in weight_dims or shape[1] in weight_dims)
                                              for shape in c[1] if shape)]
    assert not weight_copies, weight_copies[:5]
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.runner.weights_bytes == before


def test_bad_levels_are_refused_naming_the_field(elastic_fp32, plain_fp32) -> None:
    engine = elastic_fp32.engine
    missing = next(value for value in range(99, 0, -1) if value not in engine.elastic_levels)
    with pytest.raises(InvalidRequestError) as unknown:
        engine.add_request("bad-level", "hi", SamplingParams(max_tokens=2), elastic_level=missing)
    assert unknown.value.param == "elastic.level" and "levels" in str(unknown.value)
    with pytest.raises(InvalidRequestError) as not_elastic:
        plain_fp32.engine.add_request("bad-model", "hi", SamplingParams(max_tokens=2),
                                      elastic_level=engine.elastic_levels[1])
    assert not_elastic.value.param == "elastic.level" and "not elastic" in str(not_elastic.value)
    assert not engine.has_unfinished_requests() and not plain_fp32.engine.has_unfinished_requests()


def test_prefix_cache_never_shares_kv_across_levels(elastic_fp32) -> None:
    engine = elastic_fp32.engine
    prompt = " ".join(["The history of the printing press begins in Mainz."] * 12)  # several full blocks
    params = SamplingParams(temperature=0.0, max_tokens=1)
    low = engine.elastic_levels[-1]

    def hits_of(level: int) -> int:
        before = engine.kv.prefix_cache_hits_total
        elastic_fp32.generate(prompt, params, use_tqdm=False, elastic_level=level)
        return engine.kv.prefix_cache_hits_total - before

    hits_of(100)
    assert hits_of(low) == 0, "KV of the full model served a smaller level"
    assert hits_of(low) > 0, "a repeat at the same level should hit"
    assert hits_of(100) > 0
    assert_kv_empty(elastic_fp32)
