"""A decoder layer's all-decode step as one C++ call (engine/model/layers/fused_decode.py) gives the
same bits as the layer-by-layer path: the same kernels in the same order.  Checked on the real
model through the engine (greedy tokens and their logprobs, which any differing bit of a hidden
state would move), with the call counted so that the fused path is known to have run, on the
plan this CPU (or mask) resolves, on the exact fp32 kernel, with prompt pruning scoring in some
steps and with per-request elastic levels in the batch.  Those tests keep steps with prefill
chunks layer by layer (`decode_only`); small chunks in one call attend through the decode kernel
(another summation order, so not the same bits) and are checked against the layer-by-layer path
to a tolerance, and against the step cost model's rule for them."""

from __future__ import annotations

import math

import pytest

from engine import SamplingParams
from engine.config import PromptPruningConfig
from engine.kernels.cpu import native_library
from engine.model.layers import fused_decode
from tests.conftest import assert_kv_empty, make_llm

PROMPTS = ["The capital of France is", "Write a short poem about the sea.", "def fibonacci(n):"]

pytestmark = pytest.mark.skipif(native_library.load() is None, reason="no native CPU kernels on this machine")


@pytest.fixture
def decode_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Steps holding a prefill chunk run layer by layer (as before chunks could take the call)."""
    monkeypatch.setattr(fused_decode, "ONE_CALL_MAX_ROWS", 0)


@pytest.fixture
def fused_runs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Each one-call step's runs of layers, one entry a call: their sum is the layers fused."""
    runs: list[int] = []
    run = fused_decode.kernel.decode_layers

    def counted(stack, *args) -> None:
        runs.append(stack.num_layers)
        run(stack, *args)

    monkeypatch.setattr(fused_decode.kernel, "decode_layers", counted)
    return runs


def _runs_between_prune_layers(llm) -> list[int]:
    bounds = (0, *llm.engine.runner.prune_layers, len(llm.engine.runner.model.layers))
    return [end - start for start, end in zip(bounds, bounds[1:])]


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


@pytest.mark.parametrize("settings", [{}, {"dtype": "float32", "weight_format": "native"}, {"kv_cache_dtype": "int8"}],
                         ids=["auto", "fp32-exact", "int8-kv"])
def test_fused_layers_give_the_layer_by_layer_bits(decode_only, fused_runs, settings):
    # No prefix caching: each run computes every prompt afresh.
    llm = make_llm(elastic="off", kv_cache_memory=0.25, enable_prefix_caching=False, **settings)
    fused = _generate(llm, PROMPTS)
    num_layers = len(llm.engine.runner.model.layers)
    # 19 all-decode steps (the first token comes with the prefill), every layer fused in each,
    # in one call from each prune layer to the next.
    assert sum(fused_runs) == 19 * num_layers
    assert fused_runs == _runs_between_prune_layers(llm) * 19
    assert _layer_by_layer(llm, PROMPTS) == fused
    assert_kv_empty(llm)


def test_pruned_prompts_score_layer_by_layer_and_decode_fused(decode_only, fused_runs):
    """Prompt pruning's score layers run layer by layer in the steps that score a prompt (their
    attention weights are read) and fused in plain decode steps; the answers are the same bits."""
    # No prefix caching: each run computes every prompt afresh, so the two runs are comparable.
    llm = make_llm(elastic="off", kv_cache_memory=0.25, enable_prefix_caching=False,
                   prompt_pruning=PromptPruningConfig(min_prompt_tokens=64))
    long_prompt = " ".join(["The history of the Roman Empire spans many centuries and regions."] * 12)
    prompts = [long_prompt + " In summary,", *PROMPTS]
    fused = _generate(llm, prompts, prompt_keep=0.5)
    assert sum(fused_runs) > 0
    # A call's run of layers ends at each prune layer, where the rows change.
    assert llm.engine.runner.prune_layers and max(fused_runs) == max(_runs_between_prune_layers(llm))
    assert _layer_by_layer(llm, prompts, prompt_keep=0.5) == fused
    assert_kv_empty(llm)


def test_dense_weights_have_no_fused_path():
    llm = make_llm(dtype="float32", weight_format="dequantized", elastic="off", kv_cache_memory=0.25)
    assert all(layer.fused_decode is None for layer in llm.engine.runner.model.layers)


@pytest.mark.parametrize("levels", [[100, 90, 80, 70, 55, 40], [40, 100, 70, 55, 90, 80], [40] * 6],
                         ids=["level-order", "mixed-order", "one-level"])
def test_elastic_levels_fused_match_the_tile_path(decode_only, fused_runs, levels):
    """Rows at several levels (in level order, out of it, all at one) take the fused call when the
    weights have column views (Q8 activations re-block the permuted down projection), and give
    the tile path's tokens and logprobs."""
    llm = make_llm(elastic="on", dtype="float32", weight_format="native_q8", kv_cache_memory=0.25,
                   enable_prefix_caching=False)
    prompts = [*PROMPTS, "Tell me about the moon.", "List three colours.", "Why is the sky blue?"]
    fused = _generate(llm, prompts, elastic_level=levels)
    assert sum(fused_runs) == 19 * len(llm.engine.runner.model.layers)
    assert _layer_by_layer(llm, prompts, elastic_level=levels) == fused
    assert_kv_empty(llm)


def test_exact_elastic_plan_runs_levels_layer_by_layer(decode_only, fused_runs):
    """The exact kernel keeps the permuted down projection's file blocks (no column views): a
    step with rows below the full level runs its elastic layers layer by layer (the anchors, whole
    at every level, fused), a full-level step every layer fused."""
    llm = make_llm(elastic="on", dtype="float32", weight_format="native", kv_cache_memory=0.25,
                   enable_prefix_caching=False)
    layers = llm.engine.runner.model.layers
    anchors = sum(layer.attention.elastic is None and layer.feed_forward.elastic is None for layer in layers)
    assert 0 < anchors < len(layers)
    _generate(llm, PROMPTS, elastic_level=70)
    assert sum(fused_runs) == 19 * anchors
    # Each call runs a stretch of consecutive anchors: a layer that does not qualify ends a run.
    is_anchor = "".join("a" if layer.attention.elastic is None and layer.feed_forward.elastic is None else "e"
                        for layer in layers)
    stretches = [len(stretch) for stretch in is_anchor.split("e") if stretch]
    assert fused_runs == stretches * 19
    fused_runs.clear()
    _generate(llm, PROMPTS, elastic_level=100)
    assert sum(fused_runs) == 19 * len(llm.engine.runner.model.layers)


@pytest.fixture
def prefill_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts one-call layers that ran a step holding a prefill chunk."""
    calls = [0]
    run = fused_decode.FusedDecode.run_layers

    def counted(layers, x, residual, kv_caches, batch):
        calls[0] += len(layers) * (batch.attention.num_decodes < batch.attention.num_seqs)
        return run(layers, x, residual, kv_caches, batch)

    monkeypatch.setattr(fused_decode.FusedDecode, "run_layers", staticmethod(counted))
    return calls


LONGER_PROMPTS = [*PROMPTS, "Explain in two sentences why the ocean is salty and where the salt comes from.",
                  "Translate to French: the cat sleeps on the warm windowsill all afternoon."]


def test_small_prefill_chunks_in_one_call_match_the_layer_by_layer_path(prefill_calls):
    """Chunks of a 16-token budget beside decodes, on the exact fp32 kernel: each chunk token
    attends over its causal prefix in the decode kernel; the greedy tokens are the layer-by-layer
    path's and their logprobs within 1e-4 (another summation order, not the same bits)."""
    llm = make_llm(elastic="off", dtype="float32", weight_format="native", kv_cache_memory=0.25,
                   enable_prefix_caching=False, max_num_batched_tokens=16)
    one_call = _generate(llm, LONGER_PROMPTS)
    calls = prefill_calls[0]
    assert calls > 0
    reference = _layer_by_layer(llm, LONGER_PROMPTS)
    assert prefill_calls[0] == calls
    assert [tokens for tokens, _ in one_call] == [tokens for tokens, _ in reference]
    gaps = [abs(a[t] - b[t]) for (_, x), (_, y) in zip(one_call, reference) for a, b in zip(x, y) for t in a if t in b]
    assert max(gaps) < 1e-4
    assert_kv_empty(llm)


def test_pruned_prompts_with_small_chunks_in_one_call_match_the_layer_by_layer_path(prefill_calls):
    """Prompt pruning's stages in one-call steps (the deep layers' kept rows with their own KV
    group's metadata), exact fp32 kernel: the layer-by-layer path's tokens, logprobs within 1e-4."""
    llm = make_llm(elastic="off", dtype="float32", weight_format="native", kv_cache_memory=0.25,
                   enable_prefix_caching=False, max_num_batched_tokens=24,
                   prompt_pruning=PromptPruningConfig(min_prompt_tokens=64))
    long_prompt = " ".join(["The history of the Roman Empire spans many centuries and regions."] * 12)
    prompts = [long_prompt + " In summary,", *PROMPTS]
    one_call = _generate(llm, prompts, prompt_keep=0.5)
    assert prefill_calls[0] > 0
    reference = _layer_by_layer(llm, prompts, prompt_keep=0.5)
    assert [tokens for tokens, _ in one_call] == [tokens for tokens, _ in reference]
    gaps = [abs(a[t] - b[t]) for (_, x), (_, y) in zip(one_call, reference) for a, b in zip(x, y) for t in a if t in b]
    assert max(gaps) < 1e-4
    assert_kv_empty(llm)


def test_prompts_at_two_levels_in_one_call_steps_score_as_the_layer_by_layer_path(prefill_calls):
    """Two requests at levels 100 and 55 prefill side by side in 16-token chunks (rows of two
    levels in each one-call step, Q8 activations as auto runs them): each prompt's perplexity
    within 1% of the layer-by-layer path's.  Q8 rounds activations per block, so a last-bit
    difference upstream moves a token's logprob by up to a few tenths either way: the prompt must
    be long enough for those to average out.  Measured on an Intel Xeon, one call / layer by layer
    - 1 at levels 100 and 55, over 200 / 512 tokens: quick checkpoint -0.79%, -0.96% / -0.40%,
    -0.54%; thorough and distilled +0.47%, +1.12% / +0.45%, +0.01%."""
    from tests.model.test_weight_formats import _sharegpt_answer

    llm = make_llm(elastic="on", dtype="float32", weight_format="native_q8", kv_cache_memory=0.25,
                   enable_prefix_caching=False, max_num_batched_tokens=32)
    prompt = _sharegpt_answer(llm.engine.tokenizer, 512)
    one_call = _prompt_perplexities(llm, prompt, [100, 55])
    assert prefill_calls[0] > 0
    layers = llm.engine.runner.model.layers
    saved = [layer.fused_decode for layer in layers]
    for layer in layers:
        layer.fused_decode = None
    try:
        reference = _prompt_perplexities(llm, prompt, [100, 55])
    finally:
        for layer, fused in zip(layers, saved):
            layer.fused_decode = fused
    assert reference[1] > reference[0] * 1.1  # the two levels are told apart
    for ours, theirs in zip(one_call, reference):
        assert abs(ours / theirs - 1) < 0.01, (one_call, reference)
    assert_kv_empty(llm)


def _prompt_perplexities(llm, prompt: list[int], levels: list[int]) -> list[float]:
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    outputs = llm.generate([{"prompt_token_ids": prompt}] * len(levels), params, use_tqdm=False, elastic_level=levels)
    return [math.exp(-sum(entry[token].logprob for entry, token in zip(o.prompt_logprobs[1:], prompt[1:]))
                     / (len(prompt) - 1)) for o in outputs]


def test_one_call_prefill_steps_are_what_the_cost_model_prices_without_the_layer_by_layer_term():
    """The runner states its bounds to the step cost model, and a layer takes the call for a step
    exactly when those bounds cover the step's features (the per-step term is skipped then)."""
    from engine.scheduler.cost_model import features_of_chunks

    llm = make_llm(elastic="off", kv_cache_memory=0.25, enable_prefix_caching=False, scheduling_policy="slo")
    limits = llm.engine.runner.one_call_steps
    assert limits is not None and llm.engine.cost_model.one_call == limits
    cases = [((7, 1), (300, 1), (0, 8)),                                   # decodes + a short prompt
             ((0, limits.max_rows),),                                      # a prompt of max_rows
             ((0, limits.max_rows + 1),),                                  # one row more
             ((limits.max_prefill_pairs // 8 - 8, 8),),                    # pairs at the bound
             ((limits.max_prefill_pairs // 8 - 7, 8),)]                    # one key more each
    for chunks in cases:
        features = features_of_chunks((c, n, True) for c, n in chunks)
        meta = _metadata(chunks)
        assert fused_decode._prefill_fits(meta, limits) == limits.covers(features), chunks
        assert llm.engine.cost_model.runs_layer_by_layer(features) == (not limits.covers(features)), chunks
    assert limits.covers(features_of_chunks([(7, 1, True), (300, 1, True), (0, 8, True)]))
    assert not limits.covers(features_of_chunks([(0, limits.max_rows + 1, True)]))


def _metadata(chunks):
    """Just the counts of an AttentionMetadata that _prefill_fits reads: decodes first."""
    from types import SimpleNamespace

    chunks = sorted(chunks, key=lambda chunk: chunk[1] != 1)
    starts = [0]
    for _, n in chunks:
        starts.append(starts[-1] + n)
    return SimpleNamespace(query_start_loc_cpu=starts, seq_lens_cpu=[c + n for c, n in chunks],
                           num_decodes=sum(n == 1 for _, n in chunks), num_seqs=len(chunks))
