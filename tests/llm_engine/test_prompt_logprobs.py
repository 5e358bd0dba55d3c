"""Prompt logprobs end to end on the real model (fp32): equal to one full forward's log_softmax
whatever the chunking, beside requests that do not want them, never from prefix-cache hits, and
sent once through preemptions."""

from __future__ import annotations

import pytest

from engine.sampling_params import SamplingParams
from tests.conftest import assert_kv_empty, make_llm
from tests.worker.test_prompt_logprobs import PROMPT, assert_scored_as_reference, full_forward_logprobs


def test_a_chunked_prompt_is_scored_as_a_full_forward(llm_fp32):
    """llm_fp32 runs 64 tokens a step: the prompt spans three steps, and shares them with a request
    that does not want prompt logprobs; neither's sampled tokens change."""
    tokenizer = llm_fp32.get_tokenizer()
    prompt = tokenizer.encode(PROMPT)
    other = tokenizer.encode("The capital of France is")
    assert len(prompt) > 2 * 64
    reference = full_forward_logprobs(llm_fp32, prompt)
    greedy = SamplingParams(temperature=0.0, max_tokens=4)
    scored = SamplingParams(temperature=0.0, max_tokens=4, prompt_logprobs=3)
    alone = llm_fp32.generate([{"prompt_token_ids": prompt}, {"prompt_token_ids": other}], greedy, use_tqdm=False)
    together = llm_fp32.generate([{"prompt_token_ids": other}, {"prompt_token_ids": prompt}], [greedy, scored],
                                 use_tqdm=False)
    assert together[0].prompt_logprobs is None
    assert_scored_as_reference(together[1].prompt_logprobs, prompt, reference, num_top=3)
    assert together[1].outputs[0].token_ids == alone[0].outputs[0].token_ids
    assert together[0].outputs[0].token_ids == alone[1].outputs[0].token_ids
    assert together[1].prompt_logprobs[5][prompt[5]].decoded_token == tokenizer.token_text(prompt[5])
    assert_kv_empty(llm_fp32)


def test_prompt_logprobs_never_start_from_prefix_cache_hits(llm_fp32):
    engine = llm_fp32.engine
    prompt = engine.tokenizer.encode(PROMPT)
    greedy = SamplingParams(temperature=0.0, max_tokens=2)
    llm_fp32.generate([{"prompt_token_ids": prompt}], greedy, use_tqdm=False)  # caches its full blocks
    hits = engine.kv.prefix_cache_hits_total
    [out] = llm_fp32.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0.0, max_tokens=2,
                                                                             prompt_logprobs=1), use_tqdm=False)
    assert engine.kv.prefix_cache_hits_total == hits, "a request scoring its prompt started from cached blocks"
    assert_scored_as_reference(out.prompt_logprobs, prompt, full_forward_logprobs(llm_fp32, prompt), num_top=1)
    llm_fp32.generate([{"prompt_token_ids": prompt}], greedy, use_tqdm=False)
    assert engine.kv.prefix_cache_hits_total > hits, "others still share the prompt's cached blocks"
    assert_kv_empty(llm_fp32)


def test_n_samples_share_one_scored_prompt(llm_fp32):
    prompt = llm_fp32.get_tokenizer().encode("Once upon a time, in a land far away,")
    params = SamplingParams(n=2, temperature=0.8, seed=1, max_tokens=3, prompt_logprobs=0)
    [out] = llm_fp32.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
    assert len(out.outputs) == 2
    assert_scored_as_reference(out.prompt_logprobs, prompt, full_forward_logprobs(llm_fp32, prompt), num_top=0)


@pytest.mark.slow  # loads a second engine, with a KV pool small enough to preempt
def test_preemption_sends_prompt_logprobs_once():
    """5 blocks of 16 tokens for three ~30-token prompts growing 12 tokens each: two running
    requests outgrow the pool, so requests are preempted and recomputed."""
    llm = make_llm(dtype="float32", weight_format="dequantized", max_num_batched_tokens=64, num_kv_blocks=5)
    engine = llm.engine
    sent: dict[str, int] = {}
    execute = engine.runner.execute

    def counting_execute(scheduler_output):
        output = execute(scheduler_output)
        for request_id in output.prompt_logprobs:
            sent[request_id] = sent.get(request_id, 0) + 1
        return output

    engine.runner.execute = counting_execute
    words = PROMPT.split()
    prompts = [engine.tokenizer.encode(" ".join(words[i:i + 24])) for i in (0, 30, 60)]
    assert all(26 <= len(p) <= 34 for p in prompts), [len(p) for p in prompts]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, prompt_logprobs=1)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert engine.scheduler.num_preemptions_total > 0
    assert sorted(sent.values()) == [1, 1, 1]
    for prompt, out in zip(prompts, outputs):
        assert len(out.outputs[0].token_ids) == 12
        assert_scored_as_reference(out.prompt_logprobs, prompt, full_forward_logprobs(llm, prompt), num_top=1)
    assert_kv_empty(llm)
