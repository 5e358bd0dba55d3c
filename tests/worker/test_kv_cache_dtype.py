"""The int8 KV cache (`kv_cache_dtype="int8"`, engine/kernels/kv_cache_format.py) on the real
model: the blocks it buys, the answers it scores, and the settings it refuses."""

from __future__ import annotations

import math

import pytest
import torch

from engine import SamplingParams
from engine.bench.conversations import held_out_conversations
from engine.bench.teacher_forcing import prefill_logits
from engine.config import CacheConfig, ConfigError, PromptPruningConfig
from tests.conftest import assert_kv_empty, make_llm


def test_int8_rows_fit_about_twice_the_blocks_in_the_same_memory():
    auto = make_llm(elastic="off", kv_cache_memory=0.25)
    int8 = make_llm(elastic="off", kv_cache_memory=0.25, kv_cache_dtype="int8")
    # A row of 64 values is 128 bytes in bf16 (256 in fp32, the dtype where the CPU lacks bf16),
    # an int8 row 64 + its 4-byte scale; with prompt pruning each slot also keeps a hidden row in
    # the model's dtype, in either format.
    runner = auto.engine.runner
    rows = 2 * len(runner.kv_caches) * runner.kv_caches[0].shape[3]
    element = runner.kv_caches[0].element_size()
    hidden = 0 if runner.hidden_cache is None else runner.hidden_cache.shape[1] * element
    expected = (rows * 64 * element + hidden) / (rows * 68 + hidden)
    assert int8.engine.runner.num_kv_blocks / runner.num_kv_blocks == pytest.approx(expected, rel=0.005)
    assert expected > 1.75
    for llm in (auto, int8):
        assert llm.engine.runner.kv_cache_bytes <= 0.25 * (1 << 30)
    assert all(cache.dtype == torch.int8 for cache in int8.engine.runner.kv_caches)


def _answer_logits(llm, conversations) -> list[torch.Tensor]:
    return [prefill_logits(llm, c.token_ids, torch.arange(len(c.prompt_token_ids) - 1, len(c.token_ids) - 1))
            for c in conversations]


def test_int8_cache_scores_held_out_answers_as_the_model_dtype_does():
    """Teacher-forced answers of held-out ShareGPT conversations: perplexity within 1% of the bf16
    cache's and the same top token at 93% of positions or more (measured: 4.554 against 4.560 and
    97% over 8 conversations)."""
    auto = make_llm(elastic="off", kv_cache_memory=0.25)
    int8 = make_llm(elastic="off", kv_cache_memory=0.25, kv_cache_dtype="int8")
    conversations = held_out_conversations(auto.get_tokenizer(), 4, seed=0, max_seq_len=512)
    nll, agree, count = {"auto": 0.0, "int8": 0.0}, 0, 0
    for conversation, reference, quantized in zip(conversations, _answer_logits(auto, conversations),
                                                  _answer_logits(int8, conversations)):
        targets = torch.tensor(conversation.answer_token_ids)[:, None]
        for name, logits in (("auto", reference), ("int8", quantized)):
            nll[name] -= float(torch.log_softmax(logits.double(), -1).gather(1, targets).sum())
        agree += int((reference.argmax(-1) == quantized.argmax(-1)).sum())
        count += targets.shape[0]
    assert count > 500
    assert math.exp(nll["int8"] / count) / math.exp(nll["auto"] / count) == pytest.approx(1.0, abs=0.01)
    assert agree / count >= 0.93


def test_int8_cache_serves_shared_prefixes_and_frees_every_block():
    llm = make_llm(elastic="off", kv_cache_memory=0.25, kv_cache_dtype="int8")
    prefix = "You are a helpful assistant. " * 12
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    first = llm.generate([prefix + "Name a color."], params, use_tqdm=False)
    outputs = llm.generate([prefix + f"Name a fruit number {i}." for i in range(4)], params, use_tqdm=False)
    assert llm.engine.kv.prefix_cache_hits_total >= 4 * 16
    assert all(len(o.outputs[0].token_ids) == 12 for o in first + outputs)
    assert_kv_empty(llm)


def test_unknown_kv_cache_dtype_names_the_setting():
    with pytest.raises(ConfigError, match="kv_cache_dtype"):
        CacheConfig(kv_cache_dtype="fp8")


def test_int8_cache_under_pruned_prompts_and_elastic_levels_keeps_the_pass_key():
    """Prompt pruning scores the prompt from the int8 keys, and elastic rows of several levels
    decode over the same int8 cache in one step."""
    llm = make_llm(elastic="on", kv_cache_memory=0.25, kv_cache_dtype="int8", max_num_batched_tokens=64,
                   prompt_pruning=PromptPruningConfig(min_prompt_tokens=96, window=16, num_sink_tokens=4))
    text = ("The grass is green. The sky is blue. " * 12 + "The pass key is 48213. Remember it. "
            + "The sun is yellow. Here we go. " * 10 + "What is the pass key? The pass key is ")
    levels = llm.engine.elastic_levels
    outputs = llm.generate([text] * 3, SamplingParams(temperature=0.0, max_tokens=6), use_tqdm=False,
                           prompt_keep=[1.0, 0.5, 1.0], elastic_level=[levels[0], levels[0], levels[1]])
    assert "48213" in outputs[0].outputs[0].text and "48213" in outputs[1].outputs[0].text
    assert outputs[1].num_prompt_tokens_computed_in_full < outputs[0].num_prompt_tokens_computed_in_full
    assert llm.engine.stats.num_pruned_prompt_tokens_total > 0
    assert_kv_empty(llm)
