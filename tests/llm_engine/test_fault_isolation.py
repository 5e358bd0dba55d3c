"""One request's failure stays its own, on the real model: a row whose logits are not finite,
and a request whose detokenization fails (the documented fault hook), each end that request (and
its sibling samples) with finish_reason "error" while every other request in the same batches
gets exactly the tokens it gets alone; their KV is freed and the failures are counted by reason."""

from __future__ import annotations

import pytest
import torch

from engine import SamplingParams
from engine.fault_injection import ENV_VAR, FaultInjector
from tests.conftest import assert_kv_empty, make_llm

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time,"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def llm():
    return make_llm(kv_cache_memory=0.25, max_num_batched_tokens=128)


def alone(llm, prompt: str) -> list[int]:
    return list(llm.generate(prompt, GREEDY, use_tqdm=False)[0].outputs[0].token_ids)


def run_batch(llm, prompts: list, params: list[SamplingParams]) -> dict:
    engine = llm.engine
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        engine.add_request(f"batch-{i}", prompt, p)
    finals = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finals[output.request_id] = output
    return finals


def test_nonfinite_logits_fail_only_their_row(llm) -> None:
    want = {prompt: alone(llm, prompt) for prompt in PROMPTS}
    model = llm.engine.runner.model
    compute_logits, calls = model.compute_logits, []

    def poison_second_row_once(hidden: torch.Tensor) -> torch.Tensor:
        logits = compute_logits(hidden)
        calls.append(logits.shape[0])
        if len(calls) == 3:  # a decode step with every request in it
            logits[1] = float("nan")
        return logits

    model.compute_logits = poison_second_row_once
    errors_before = dict(llm.engine.stats.num_request_errors_total)
    try:
        finals = run_batch(llm, PROMPTS, [GREEDY] * 3)
    finally:
        del model.compute_logits
    assert calls[2] == 3
    failed = finals["batch-1"]
    assert failed.outputs[0].finish_reason == "error" and failed.error[0] == "nonfinite_logits"
    for i in (0, 2):
        assert finals[f"batch-{i}"].error is None
        assert list(finals[f"batch-{i}"].outputs[0].token_ids) == want[PROMPTS[i]]
    errors = llm.engine.stats.num_request_errors_total
    assert errors["nonfinite_logits"] == errors_before.get("nonfinite_logits", 0) + 1
    assert_kv_empty(llm)


def test_a_detokenizer_fault_fails_the_request_and_its_samples(llm) -> None:
    poison = 7777
    want = [alone(llm, prompt) for prompt in PROMPTS[:2]]
    llm.engine.faults = FaultInjector("detokenize", poison)
    try:
        tokens = llm.engine.tokenizer.encode(PROMPTS[2]) + [poison]
        params = [GREEDY, GREEDY, SamplingParams(temperature=0.8, n=3, max_tokens=12, seed=1)]
        finals = run_batch(llm, [*PROMPTS[:2], tokens], params)
    finally:
        llm.engine.faults = None
    failed = finals["batch-2"]
    assert failed.error[0] == "detokenize" and "7777" not in failed.error[1]
    assert [c.finish_reason for c in failed.outputs] == ["error"] * 3
    for i in (0, 1):
        assert list(finals[f"batch-{i}"].outputs[0].token_ids) == want[i]
    assert_kv_empty(llm)
    llm.engine.check_invariants()


def test_the_fault_hook_reads_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, "detokenize:12")
    assert FaultInjector.from_env() == FaultInjector("detokenize", 12)
    monkeypatch.setenv(ENV_VAR, "sampler:12")
    with pytest.raises(ValueError, match=ENV_VAR):
        FaultInjector.from_env()
    monkeypatch.delenv(ENV_VAR)
    assert FaultInjector.from_env() is None
