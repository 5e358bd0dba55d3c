"""Prefix caching on the real model: identical outputs with it on and off, hits counted in tokens,
and a multi-turn chat reusing its history."""

from __future__ import annotations

from engine import SamplingParams
from tests.conftest import assert_kv_empty, make_llm

GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)


def shared_prefix_prompts(sharegpt_prompts: list[str]) -> list[str]:
    system = "You are a careful assistant. Answer briefly and precisely.\n" + sharegpt_prompts[10] * 2
    return [system + "\nQuestion: " + question for question in sharegpt_prompts[:6]]


def test_outputs_identical_with_prefix_caching_on_and_off(llm_fp32, sharegpt_prompts):
    prompts = shared_prefix_prompts(sharegpt_prompts)
    outputs = {}
    for enabled in (False, True):
        llm = make_llm(dtype="float32", max_num_batched_tokens=64, block_size=16, kv_cache_memory=0.25,
                       enable_prefix_caching=enabled)
        first = llm.generate(prompts[:1], GREEDY, use_tqdm=False)  # fills the cache when enabled
        rest = llm.generate(prompts[1:], GREEDY, use_tqdm=False)
        outputs[enabled] = [o.outputs[0].token_ids for o in first + rest]
        stats = llm.engine.get_stats()
        if enabled:
            prefix_len = len(llm.get_tokenizer().encode(prompts[0].split("\nQuestion: ")[0]))
            # Every later prompt finds the shared prefix's full blocks.
            assert stats.prefix_cache_hits_total >= 5 * (prefix_len // 16 - 1) * 16
        else:
            assert stats.prefix_cache_hits_total == 0 and stats.prefix_cache_queries_total == 0
        assert_kv_empty(llm)
    assert outputs[True] == outputs[False]


def test_multi_turn_chat_reuses_its_history(llm_bf16):
    engine = llm_bf16.engine
    conversation = [{"role": "user", "content": "Name three rivers in Europe and one fact about each."}]
    first = llm_bf16.chat(conversation, SamplingParams(temperature=0.0, max_tokens=48), use_tqdm=False)[0]
    hits_before = engine.kv.prefix_cache_hits_total
    conversation += [{"role": "assistant", "content": first.outputs[0].text},
                     {"role": "user", "content": "Which of them is the longest?"}]
    llm_bf16.chat(conversation, SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)
    # The second turn's prompt starts with the first turn's prompt: its full blocks are hits.
    first_prompt_blocks = len(first.prompt_token_ids) // 16
    assert engine.kv.prefix_cache_hits_total - hits_before >= first_prompt_blocks * 16
    assert_kv_empty(llm_bf16)
