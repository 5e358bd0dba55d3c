"""End-to-end generation on the real model: batching, preemption, sampling, stopping."""

from __future__ import annotations

import pytest

from engine import SamplingParams
from engine.llm_engine import InvalidRequestError
from engine.model.layers.linear import Linear
from tests.conftest import assert_kv_empty, make_llm

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


def test_batch_invariance(llm_fp32, sharegpt_prompts):
    alone = llm_fp32.generate([sharegpt_prompts[0]], GREEDY, use_tqdm=False)[0]
    batched = llm_fp32.generate(sharegpt_prompts, GREEDY, use_tqdm=False)
    assert batched[0].outputs[0].token_ids == alone.outputs[0].token_ids
    assert len(batched) == 32 and all(len(o.outputs[0].token_ids) == 24 for o in batched)
    assert_kv_empty(llm_fp32)


def test_preemption_under_scarce_kv_keeps_greedy_tokens(llm_fp32, sharegpt_prompts):
    tokenizer = llm_fp32.get_tokenizer()
    long_prompt = " ".join(sharegpt_prompts)[:2400]
    num_long = len(tokenizer.encode(long_prompt))
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    # Room for the long request and two spare blocks: the short ones must preempt or be preempted.
    num_blocks = -(-(num_long + 32) // 16) + 2
    scarce = make_llm(dtype="float32", max_num_batched_tokens=64, block_size=16, num_kv_blocks=num_blocks)
    prompts = [long_prompt] + sharegpt_prompts[:7]
    outputs = scarce.generate(prompts, params, use_tqdm=False)
    assert scarce.engine.scheduler.num_preemptions_total > 0
    reference = llm_fp32.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == [o.outputs[0].token_ids for o in reference]
    assert_kv_empty(scarce)


def test_seeded_sampling_is_reproducible_whatever_the_batch(llm_fp32, sharegpt_prompts):
    seeded = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=16, seed=1234)
    alone = llm_fp32.generate([sharegpt_prompts[1]], seeded, use_tqdm=False)[0].outputs[0]
    others = [SamplingParams(temperature=1.0, max_tokens=16)] * 7
    batch = llm_fp32.generate(sharegpt_prompts[1:9], [seeded] + others, use_tqdm=False)
    assert batch[0].outputs[0].token_ids == alone.token_ids
    other_seed = llm_fp32.generate([sharegpt_prompts[1]], SamplingParams(temperature=1.0, top_p=0.9, max_tokens=16,
                                                                         seed=99), use_tqdm=False)[0].outputs[0]
    assert other_seed.token_ids != alone.token_ids


def test_stop_string_across_token_boundary(llm_fp32):
    prompt = "The capital of France is"
    free = llm_fp32.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0]
    tokenizer = llm_fp32.get_tokenizer()
    pieces = [tokenizer.decode(free.token_ids[: i + 1]) for i in range(len(free.token_ids))]
    # A stop string made of the last 2 characters of token 4's text and the first 2 of token 5's.
    boundary = len(pieces[3])
    stop = free.text[boundary - 2: boundary + 2]
    assert len(stop) == 4
    stopped = llm_fp32.generate([prompt], SamplingParams(temperature=0.0, max_tokens=24, stop=[stop]),
                                use_tqdm=False)[0].outputs[0]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == stop
    assert stopped.text == free.text[: free.text.index(stop)]
    assert stop not in stopped.text
    assert_kv_empty(llm_fp32)


def test_stop_token_ids_max_tokens_and_min_tokens(llm_fp32):
    prompt = "1, 2, 3, 4,"
    free = llm_fp32.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0]
    stop_id = free.token_ids[3]
    out = llm_fp32.generate([prompt], SamplingParams(temperature=0.0, max_tokens=24, stop_token_ids=[stop_id]),
                            use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id
    assert out.token_ids == free.token_ids[: free.token_ids.index(stop_id) + 1]
    short = llm_fp32.generate([prompt], SamplingParams(temperature=0.0, max_tokens=3), use_tqdm=False)[0].outputs[0]
    assert short.finish_reason == "length" and len(short.token_ids) == 3
    eos = llm_fp32.get_tokenizer().eos_token_id
    chat = llm_fp32.chat([{"role": "user", "content": "Say hi."}],
                         SamplingParams(temperature=0.0, max_tokens=40, min_tokens=30), use_tqdm=False)[0].outputs[0]
    assert len(chat.token_ids) >= 30 and eos not in chat.token_ids[:30]


def test_n_samples_logprobs_and_logit_bias(llm_fp32):
    out = llm_fp32.generate(["Once upon a time"], SamplingParams(n=3, temperature=1.0, max_tokens=8, seed=7,
                                                                 logprobs=3), use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    for completion in out.outputs:
        assert len(completion.logprobs) == len(completion.token_ids) == 8
        for token_id, entry in zip(completion.token_ids, completion.logprobs):
            assert token_id in entry and 3 <= len(entry) <= 4
            ranks = sorted(lp.rank for lp in entry.values())
            assert ranks[:3] == [1, 2, 3] or entry[token_id].rank > 3
            assert all(lp.logprob <= 0 for lp in entry.values())
        assert completion.cumulative_logprob == pytest.approx(
            sum(e[t].logprob for t, e in zip(completion.token_ids, completion.logprobs)), rel=1e-5)
    free = llm_fp32.generate(["The capital of France is"], GREEDY, use_tqdm=False)[0].outputs[0]
    banned = free.token_ids[0]
    biased = llm_fp32.generate(["The capital of France is"],
                               SamplingParams(temperature=0.0, max_tokens=4, logit_bias={banned: -100.0}),
                               use_tqdm=False)[0].outputs[0]
    assert biased.token_ids[0] != banned
    assert_kv_empty(llm_fp32)


def test_repetition_penalty_changes_greedy_output(llm_fp32):
    prompt = "1, 2, 3, 4,"
    free = llm_fp32.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0]
    penalized = llm_fp32.generate([prompt], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True,
                                                           repetition_penalty=2.0, frequency_penalty=1.0),
                                  use_tqdm=False)[0].outputs[0]
    assert penalized.token_ids != free.token_ids
    assert len(set(penalized.token_ids)) > len(set(free.token_ids))


def test_bad_requests_are_refused_and_leave_no_state(llm_fp32):
    engine = llm_fp32.engine
    with pytest.raises(InvalidRequestError, match="maximum context length"):
        engine.add_request("too-long", [5] * 10, SamplingParams(max_tokens=engine.max_model_len))
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        engine.add_request("bad-ids", [1, 10**9], SamplingParams())
    with pytest.raises(InvalidRequestError, match="empty"):
        engine.add_request("empty", [], SamplingParams())
    assert_kv_empty(llm_fp32)


def test_abort_frees_kv_mid_generation(llm_fp32):
    engine = llm_fp32.engine
    # ignore_eos: a sampled end of text within the first steps would finish it before the abort.
    engine.add_request("abort-me", "Tell me a long story about dragons.",
                       SamplingParams(max_tokens=200, ignore_eos=True))
    for _ in range(3):
        engine.step()
    assert engine.kv.pool.num_used_blocks > 0
    engine.abort_request(["abort-me"])
    assert_kv_empty(llm_fp32)
    assert engine.step() == []


def test_memory_report_counts_weights_and_kv_budget(llm_bf16):
    report = llm_bf16.memory_report()
    # An elastic model where oneDNN prepacks bf16 keeps each level width's slice of its tiled
    # layers prepacked (engine/model/layers/linear.py): the full width's (the whole weight, plus
    # the stacked side paths) and the narrower ones, all counted.
    linears = [m for m in llm_bf16.engine.runner.model.modules() if isinstance(m, Linear) and m.packed_levels]
    assert bool(linears) == llm_bf16.engine.runner.plan.prepack_bf16  # none where oneDNN cannot prepack bf16
    narrower_bytes = 0
    for linear in linears:
        full, *narrower = [linear.packed_levels[w] for w in dict.fromkeys(linear.elastic.widths)]
        assert full.numel() >= linear.in_features * linear.out_features  # the whole weight, at least
        narrower_bytes += sum(t.numel() * t.element_size() for t in narrower)
    # SmolLM2-135M in bf16: ~135M parameters (the tied LM head packed separately for oneDNN).
    assert 0.25e9 <= report["weights_bytes"] - narrower_bytes <= 0.40e9
    assert 0.99 * (1 << 30) <= report["kv_cache_bytes"] <= 1 << 30  # kv_cache_memory=1.0 GiB
    out = llm_bf16.generate(["The capital of France is"], SamplingParams(temperature=0.0, max_tokens=8),
                            use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 8 or out.finish_reason == "stop"
    assert_kv_empty(llm_bf16)
