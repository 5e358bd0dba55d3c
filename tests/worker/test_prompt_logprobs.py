"""Prompt logprobs in the runner, on plain data: a prompt split over chunks is scored as one full
forward scores it, and a preemption (before or after the first token) never sends them twice."""

from __future__ import annotations

import pytest
import torch

from engine.outputs import PromptLogprobs
from engine.request import Request
from engine.sampling_params import SamplingParams
from engine.scheduler.output import NewRequestData, ScheduledRequest, SchedulerOutput
from engine.worker.forward_batch_builder import build_forward_batch
from engine.worker.request_states import RequestStates

TOLERANCE = 1e-4
PROMPT = ("Prompt logprobs score every token of a prompt by the logits of the position before it, "
          "so a long prompt that the scheduler splits over several steps must come out exactly as "
          "one forward over the whole prompt would score it, chunk boundaries included. The lighthouse "
          "keeper climbed the spiral stairs every evening at dusk, carrying a lantern and a small book "
          "of poems. From the top he could see the fishing boats returning to the harbour, their sails "
          "folded, their decks full of silver fish. He wrote down the name of each boat in a ledger, "
          "and when the last one was safely moored he lit the great lamp and watched its beam sweep "
          "across the dark water until morning came again.")


@torch.inference_mode()
def full_forward_logprobs(llm, prompt_token_ids: list[int]) -> torch.Tensor:
    """The reference: [P, vocab] fp32 log_softmax of the logits at every position of the prompt,
    from one forward over all of it (no chunks, no prompt-logprob code)."""
    engine, request_id = llm.engine, "full-forward-reference"
    request = Request(request_id, list(prompt_token_ids), SamplingParams(max_tokens=1), max_tokens=1)
    assert engine.kv.allocate_slots(request_id, len(prompt_token_ids))
    try:
        item = ScheduledRequest(request, 0, len(prompt_token_ids), engine.kv.block_table(request_id), samples=False,
                                new_request=NewRequestData.of(request))
        states = RequestStates()
        states.update(SchedulerOutput([item], len(prompt_token_ids)))
        batch = build_forward_batch([item], states, engine.kv.block_size, engine.runner.device)
        model = engine.runner.model
        hidden = model(batch, engine.runner.kv_caches)
        return torch.log_softmax(model.compute_logits(hidden).float(), dim=-1)
    finally:
        engine.kv.free(request_id)


def assert_scored_as_reference(prompt_logprobs: PromptLogprobs, prompt_token_ids: list[int],
                               reference: torch.Tensor, num_top: int) -> None:
    """Entry i scores prompt token i by reference row i - 1: its logprob and rank, and the top tokens."""
    assert len(prompt_logprobs) == len(prompt_token_ids) and prompt_logprobs[0] is None
    for i in range(1, len(prompt_token_ids)):
        entry, row, token_id = prompt_logprobs[i], reference[i - 1], prompt_token_ids[i]
        assert entry is not None
        assert entry[token_id].logprob == pytest.approx(float(row[token_id]), abs=TOLERANCE)
        expected_rank = int((row > row[token_id]).sum()) + 1
        # Near-ties among the many unlikely tokens may reorder within the tolerance.
        assert abs(entry[token_id].rank - expected_rank) <= (0 if expected_rank <= 10 else 3)
        top = row.topk(num_top)
        for rank, (top_id, top_logprob) in enumerate(zip(top.indices.tolist(), top.values.tolist()), start=1):
            assert entry[top_id].logprob == pytest.approx(top_logprob, abs=TOLERANCE)
            assert top_id == token_id or entry[top_id].rank == rank
        assert len(entry) == num_top + (token_id not in top.indices.tolist())


def scheduled(request: Request, start: int, count: int, block_ids: list[int], samples: bool,
              starts: bool = False, kept_block_ids: list[list[int]] = ()) -> ScheduledRequest:
    """An unpruned request's step; `kept_block_ids`: its deep groups' tables where the engine has
    several KV groups (the same tokens run every layer)."""
    num_stages = len(kept_block_ids)
    return ScheduledRequest(request, start, count, block_ids, samples,
                            new_request=NewRequestData.of(request) if starts else None,
                            kept_block_ids=list(kept_block_ids), num_kept_computed_tokens=(start,) * num_stages,
                            num_kept_scheduled_tokens=(count,) * num_stages)


def test_a_preemption_mid_prompt_rescores_from_the_start_and_sends_once(llm_fp32):
    """Chunks of 40 tokens; preempted after the first chunk, the request starts over from position
    0 with a fresh buffer, and its scores go out once, with the first token, whole and as one
    forward over the prompt gives them."""
    engine, runner = llm_fp32.engine, llm_fp32.engine.runner
    prompt = engine.tokenizer.encode(PROMPT)
    num_prompt = len(prompt)
    assert num_prompt > 80, "the prompt must span three chunks"
    reference = full_forward_logprobs(llm_fp32, prompt)
    params = SamplingParams(temperature=0.0, max_tokens=3, prompt_logprobs=2)
    request = Request("mid", prompt, params, max_tokens=3)
    assert engine.kv.allocate_slots("mid", num_prompt + 2)
    blocks, kept = engine.kv.block_table("mid"), engine.kv.kept_block_tables("mid")
    try:
        first = runner.execute(SchedulerOutput([scheduled(request, 0, 40, blocks, False, starts=True, kept_block_ids=kept)], 40))
        assert first.prompt_logprobs == {} and first.sampled == {}
        runner.execute(SchedulerOutput([], 0, preempted_request_ids={"mid"}))
        sent = []
        for start in range(0, num_prompt, 40):
            count = min(40, num_prompt - start)
            item = scheduled(request, start, count, blocks, start + count == num_prompt, starts=start == 0,
                             kept_block_ids=kept)
            sent.append(runner.execute(SchedulerOutput([item], count)).prompt_logprobs)
        assert [list(s) for s in sent] == [[]] * (len(sent) - 1) + [["mid"]]
        scored = sent[-1]["mid"]
        assert len(scored.logprobs) == num_prompt - 1
        targets = torch.tensor(prompt[1:])
        expected = reference[:-1].gather(1, targets[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(scored.logprobs), expected, atol=TOLERANCE, rtol=0)
        assert [ids[0] for ids in scored.top_token_ids] == reference[:-1].argmax(dim=-1).tolist()
        runner.execute(SchedulerOutput([], 0, finished_request_ids={"mid"}))
    finally:
        engine.kv.free("mid")


def test_a_recompute_after_the_first_token_does_not_score_again(llm_fp32):
    engine, runner = llm_fp32.engine, llm_fp32.engine.runner
    prompt = engine.tokenizer.encode("Once upon a time there was a")
    request = Request("after", prompt, SamplingParams(temperature=0.0, max_tokens=3, prompt_logprobs=0),
                      max_tokens=3)
    assert engine.kv.allocate_slots("after", len(prompt) + 2)
    blocks, kept = engine.kv.block_table("after"), engine.kv.kept_block_tables("after")
    try:
        out = runner.execute(SchedulerOutput([scheduled(request, 0, len(prompt), blocks, True, starts=True, kept_block_ids=kept)],
                                             len(prompt)))
        assert list(out.prompt_logprobs) == ["after"] and out.prompt_logprobs["after"].top_token_ids[0] == []
        request.append_output_token(out.sampled["after"].token_id)
        runner.execute(SchedulerOutput([], 0, preempted_request_ids={"after"}))
        assert not request.needs_prompt_logprobs  # delivered with the first token
        restart = scheduled(request, 0, len(prompt) + 1, blocks, True, starts=True, kept_block_ids=kept)
        again = runner.execute(SchedulerOutput([restart], len(prompt) + 1))
        assert again.prompt_logprobs == {} and "after" in again.sampled
        runner.execute(SchedulerOutput([], 0, finished_request_ids={"after"}))
    finally:
        engine.kv.free("after")
