"""A decoder layer's all-decode step as one C++ call (engine/model/layers/fused_decode.py) gives the
same bits as the layer-by-layer path: the same kernels in the same order.  Checked on the real
model through the engine (greedy tokens and their logprobs, which any differing bit of a hidden
state would move), with the call counted so that the fused path is known to have run, on the
plan this CPU (or mask) resolves, on the exact fp32 kernel, with prompt pruning scoring in some
steps and with per-request elastic levels in the batch."""

from __future__ import annotations

import pytest

from engine import SamplingParams
from engine.config import PromptPruningConfig
from engine.kernels.cpu import native_library
from engine.model.layers import fused_decode
from tests.conftest import assert_kv_empty, make_llm

PROMPTS = ["The capital of France is", "Write a short poem about the sea.", "def fibonacci(n):"]

pytestmark = pytest.mark.skipif(native_library.load() is None, reason="no native CPU kernels on this machine")


@pytest.fixture
def fused_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls = [0]
    run = fused_decode.kernel.decode_layer

    def counted(*args) -> None:
        calls[0] += 1
        run(*args)

    monkeypatch.setattr(fused_decode.kernel, "decode_layer", counted)
    return calls


def _generate(llm, prompts, **kwargs) -> list[tuple[list[int], list[dict[int, float]]]]:
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, logprobs=2)
    outputs = llm.generate(prompts, params, use_tqdm=False, **kwargs)
    return [(list(o.outputs[0].token_ids), [{t: e.logprob for t, e in d.items()} for d in o.outputs[0].logprobs])
            for o in outputs]


def _layer_by_layer(llm, prompts, **kwargs):
    layers = llm.engine.runner.model.layers
    saved = [layer.fused_decode for layer in layers]
    for layer in layers:
        layer.fused_decode = None
    try:
        return _generate(llm, prompts, **kwargs)
    finally:
        for layer, fused in zip(layers, saved):
            layer.fused_decode = fused


@pytest.mark.parametrize("settings", [{}, {"dtype": "float32", "weight_format": "native"}],
                         ids=["auto", "fp32-exact"])
def test_fused_layers_give_the_layer_by_layer_bits(fused_calls, settings):
    # No prefix caching: each run computes every prompt afresh.
    llm = make_llm(elastic="off", kv_cache_memory=0.25, enable_prefix_caching=False, **settings)
    fused = _generate(llm, PROMPTS)
    num_layers = len(llm.engine.runner.model.layers)
    # 19 all-decode steps (the first token comes with the prefill), every layer fused in each.
    assert fused_calls[0] == 19 * num_layers
    assert _layer_by_layer(llm, PROMPTS) == fused
    assert_kv_empty(llm)


def test_pruned_prompts_score_layer_by_layer_and_decode_fused(fused_calls):
    """Prompt pruning's score layers run layer by layer in the steps that score a prompt (their
    attention weights are read) and fused in plain decode steps; the answers are the same bits."""
    # No prefix caching: each run computes every prompt afresh, so the two runs are comparable.
    llm = make_llm(elastic="off", kv_cache_memory=0.25, enable_prefix_caching=False,
                   prompt_pruning=PromptPruningConfig(min_prompt_tokens=64))
    long_prompt = " ".join(["The history of the Roman Empire spans many centuries and regions."] * 12)
    prompts = [long_prompt + " In summary,", *PROMPTS]
    fused = _generate(llm, prompts, prompt_keep=0.5)
    assert fused_calls[0] > 0
    assert _layer_by_layer(llm, prompts, prompt_keep=0.5) == fused
    assert_kv_empty(llm)


def test_dense_weights_have_no_fused_path():
    llm = make_llm(dtype="float32", weight_format="dequantized", elastic="off", kv_cache_memory=0.25)
    assert all(layer.fused_decode is None for layer in llm.engine.runner.model.layers)


@pytest.mark.parametrize("levels", [[100, 90, 80, 70, 55, 40], [40, 100, 70, 55, 90, 80], [40] * 6],
                         ids=["level-order", "mixed-order", "one-level"])
def test_elastic_levels_fused_match_the_tile_path(fused_calls, levels):
    """Rows at several levels (in level order, out of it, all at one) take the fused call when the
    weights have column views (Q8 activations re-block the permuted down projection), and give
    the tile path's tokens and logprobs."""
    llm = make_llm(elastic="on", dtype="float32", weight_format="native_q8", kv_cache_memory=0.25,
                   enable_prefix_caching=False)
    prompts = [*PROMPTS, "Tell me about the moon.", "List three colours.", "Why is the sky blue?"]
    fused = _generate(llm, prompts, elastic_level=levels)
    assert fused_calls[0] == 19 * len(llm.engine.runner.model.layers)
    assert _layer_by_layer(llm, prompts, elastic_level=levels) == fused
    assert_kv_empty(llm)


def test_exact_elastic_plan_runs_levels_layer_by_layer(fused_calls):
    """The exact kernel keeps the permuted down projection's file blocks (no column views): a
    step with rows below the full level runs its elastic layers layer by layer (the anchors, whole
    at every level, fused), a full-level step every layer fused."""
    llm = make_llm(elastic="on", dtype="float32", weight_format="native", kv_cache_memory=0.25,
                   enable_prefix_caching=False)
    layers = llm.engine.runner.model.layers
    anchors = sum(layer.attention.elastic is None and layer.feed_forward.elastic is None for layer in layers)
    assert 0 < anchors < len(layers)
    _generate(llm, PROMPTS, elastic_level=70)
    assert fused_calls[0] == 19 * anchors
    fused_calls[0] = 0
    _generate(llm, PROMPTS, elastic_level=100)
    assert fused_calls[0] == 19 * len(llm.engine.runner.model.layers)
