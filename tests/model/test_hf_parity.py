"""Greedy fp32 generation matches Hugging Face transformers loading the same GGUF, token for token,
with prompts chunked over many steps (token budget 64, 16-token blocks) and all requests batched."""

from __future__ import annotations

import pytest
import torch

from engine import SamplingParams
from engine.bench.datasets import first_exchange, load_sharegpt
from tests.conftest import assert_kv_empty

PROMPT_LENGTHS = [5, 23, 64, 150, 333, 700, 1100, 1500]
NEW_TOKENS = 32


def _long_text(tokenizer, num_tokens: int) -> list[int]:
    """Real English text (ShareGPT answers back to back) cut to num_tokens."""
    ids: list[int] = []
    for record in load_sharegpt():
        exchange = first_exchange(record)
        if exchange is not None:
            ids += tokenizer.encode(exchange[1] + "\n")
        if len(ids) >= num_tokens:
            return ids[:num_tokens]
    raise AssertionError("not enough text")


@pytest.fixture(scope="module")
def prompts(llm_fp32) -> list[list[int]]:
    tokenizer = llm_fp32.get_tokenizer()
    base = _long_text(tokenizer, max(PROMPT_LENGTHS) + 200)
    # Different offsets so no two prompts share a prefix.
    return [base[17 * i: 17 * i + n] for i, n in enumerate(PROMPT_LENGTHS)]


def _hf_greedy(model, prompt: list[int]) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                             attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt):].tolist()


@pytest.mark.slow
def test_greedy_tokens_equal_transformers(llm_fp32, hf_reference, prompts):
    model, _ = hf_reference
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outputs = llm_fp32.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for prompt, output in zip(prompts, outputs):
        assert output.prompt_token_ids == prompt
        assert output.outputs[0].token_ids == _hf_greedy(model, prompt), f"prompt of {len(prompt)} tokens"
    assert_kv_empty(llm_fp32)


def test_last_token_prefill_logits_match_transformers(llm_fp32, hf_reference, prompts):
    """Run one prompt through the runner in 64-token chunks and capture the logits it samples from."""
    model, _ = hf_reference
    engine = llm_fp32.engine
    prompt = prompts[4]  # 333 tokens: six chunks
    captured = []
    compute_logits = engine.runner.model.compute_logits
    engine.runner.model.compute_logits = lambda hidden: captured.append(compute_logits(hidden)) or captured[-1]
    try:
        llm_fp32.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0.0, max_tokens=1),
                          use_tqdm=False)
    finally:
        del engine.runner.model.compute_logits
    with torch.no_grad():
        reference = model(torch.tensor([prompt])).logits[0, -1]
    assert len(captured) == 1 and captured[0].shape == (1, reference.shape[0])
    assert (captured[0][0] - reference).abs().max().item() < 1e-3
    assert_kv_empty(llm_fp32)


def test_prompt_token_ids_equal_transformers_tokenizer(llm_fp32, hf_reference):
    _, hf_tokenizer = hf_reference
    tokenizer = llm_fp32.get_tokenizer()
    texts = [first_exchange(r) for r in load_sharegpt()[:400]]
    texts = [t[0] for t in texts if t] + [
        "Hello world 12345", " leading space", "tabs\tand\nnewlines\n\n", "émojis 🤖☃ and ünïcödé",
        "<|im_start|>user\nhi<|im_end|>", "3.14159 + 2,718 = 5.86", "   ", "a" * 300,
    ]
    for text in texts:
        assert tokenizer.encode(text) == hf_tokenizer(text)["input_ids"], text[:80]
