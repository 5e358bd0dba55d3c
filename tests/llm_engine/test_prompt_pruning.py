"""Prompt pruning end to end on the real model: keep 1.0 is the unpruned path token for token,
pruned requests run beside unpruned and elastic ones in one step with every KV pool consistent
after every step, the kept sets (one per stage, nested) are a function of the prompt, and group-0
(A) prefix hits stay."""

from __future__ import annotations

import math

import pytest

from engine import SamplingParams
from engine.config import PromptPruningConfig
from tests.conftest import make_llm

PASSKEY = "48213"
PRUNING = PromptPruningConfig(min_prompt_tokens=96, window=16, num_sink_tokens=4)


@pytest.fixture(scope="module")
def llm():
    return make_llm(dtype="float32", weight_format="dequantized", max_num_batched_tokens=64, block_size=16,
                    kv_cache_memory=0.25, prompt_pruning=PRUNING)


@pytest.fixture(scope="module")
def prompt_ids(llm) -> list[int]:
    text = ("The grass is green. The sky is blue. " * 12 + f"The pass key is {PASSKEY}. Remember it. "
            + "The sun is yellow. Here we go. " * 10 + "What is the pass key? The pass key is ")
    return llm.get_tokenizer().encode(text)


GREEDY = SamplingParams(temperature=0.0, max_tokens=6)


def test_keep_one_is_the_unpruned_path(llm, prompt_ids):
    one_group = make_llm(dtype="float32", weight_format="dequantized", max_num_batched_tokens=64, block_size=16,
                         kv_cache_memory=0.25, prompt_pruning=PromptPruningConfig(enabled=False))
    assert one_group.engine.kv.num_stages == 0 and llm.engine.kv.num_stages == len(llm.engine.runner.prune_layers) == 2
    llm.engine.kv.reset_prefix_cache()
    expected = one_group.generate({"prompt_token_ids": prompt_ids}, GREEDY, use_tqdm=False)[0]
    got = llm.generate({"prompt_token_ids": prompt_ids}, GREEDY, use_tqdm=False, prompt_keep=1.0)[0]
    assert got.outputs[0].token_ids == expected.outputs[0].token_ids
    assert got.num_prompt_tokens_computed_in_full == len(prompt_ids)


def test_mixed_batch_of_pruned_unpruned_and_random_runs_in_one_step(llm, prompt_ids):
    llm.engine.kv.reset_prefix_cache()
    prompts = [{"prompt_token_ids": prompt_ids}] * 4
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False, prompt_keep=[1.0, 0.5, 0.3, 0.3],
                           prompt_scoring=[None, None, None, "random"])
    assert [o.num_prompt_tokens_computed_in_full for o in outputs] == [
        len(prompt_ids), -(-len(prompt_ids) // 2), -(-3 * len(prompt_ids) // 10), -(-3 * len(prompt_ids) // 10)]
    assert PASSKEY in outputs[0].outputs[0].text and PASSKEY in outputs[1].outputs[0].text
    assert all(len(o.outputs[0].token_ids) == 6 for o in outputs)
    assert llm.engine.stats.num_pruned_prompt_tokens_total > 0
    assert all(manager.pool.num_used_blocks == 0 for manager in llm.engine.kv.managers)


def test_kept_set_depends_on_the_prompt_alone(llm, prompt_ids):
    """Alone, or chunked beside another request that shifts its chunk boundaries: the same kept
    positions (sinks and the window among them) and the same tokens."""
    engine = llm.engine
    engine.kv.reset_prefix_cache()
    engine.add_request("alone", prompt_ids, GREEDY, prompt_keep=0.3)
    alone, kept = _run(engine)
    engine.kv.reset_prefix_cache()
    engine.add_request("other", prompt_ids[:37], GREEDY)
    engine.add_request("shifted", prompt_ids, GREEDY, prompt_keep=0.3)
    shifted, kept_shifted = _run(engine)
    assert kept["alone"] == kept_shifted["shifted"]
    assert shifted["shifted"].outputs[0].token_ids == alone["alone"].outputs[0].token_ids
    num_prompt, (first, final) = len(prompt_ids), kept["alone"]
    assert len(first) == math.ceil(0.3 ** 0.5 * num_prompt) and len(final) == math.ceil(0.3 * num_prompt)
    for stage in (first, final):  # ascending, sinks and the window among them
        assert list(stage) == sorted(set(stage))
        assert set(range(4)) | set(range(num_prompt - 16, num_prompt)) <= set(stage)
    assert set(final) < set(first)


def test_preempted_pruned_request_replays_both_kept_sets_and_its_tokens(llm, prompt_ids):
    """Preempted after its stage-B step and two decodes, a two-stage pruned request is recomputed
    from 0 with the kept sets it chose (not scored again: the recompute's rows are fewer), and
    ends with the tokens it produces alone."""
    engine = llm.engine
    engine.kv.reset_prefix_cache()
    engine.add_request("alone", prompt_ids, GREEDY, prompt_keep=0.3)
    alone, kept = _run(engine)
    engine.kv.reset_prefix_cache()
    engine.add_request("again", prompt_ids, GREEDY, prompt_keep=0.3)
    request = engine.scheduler.requests["again"]
    while len(request.output_token_ids) < 2:
        _step(engine, {}, {})
    assert request.kept_prompt_positions == kept["alone"]
    engine.scheduler._preempt(request)  # what a KV shortage does (Scheduler._preempt_below)
    again, kept_again = _run(engine)
    assert kept_again == {}  # replayed, not chosen anew
    assert request.metrics.num_preemptions == 1
    assert again["again"].outputs[0].token_ids == alone["alone"].outputs[0].token_ids


def test_group_a_prefix_hits_are_unchanged_by_pruning(llm, prompt_ids):
    """A second request sharing the prompt's first blocks finds them in group A whether or not
    the requests prune (a pruned one stops before its scoring window)."""
    hits = {}
    for keep in (1.0, 0.3):
        engine = llm.engine
        engine.kv.reset_prefix_cache()
        before = engine.kv.prefix_cache_hits_total
        llm.generate({"prompt_token_ids": prompt_ids}, GREEDY, use_tqdm=False, prompt_keep=keep)
        llm.generate({"prompt_token_ids": prompt_ids[:96] + prompt_ids[-40:]}, GREEDY, use_tqdm=False,
                     prompt_keep=keep)
        hits[keep] = engine.kv.prefix_cache_hits_total - before
    assert hits[1.0] == hits[0.3] == 96


def test_bad_prompt_keep_is_refused(llm, prompt_ids):
    from engine.llm_engine import InvalidRequestError
    for bad in (0.0, 1.5, -1, "half", True):
        with pytest.raises(InvalidRequestError) as info:
            llm.engine.add_request("bad", prompt_ids, GREEDY, prompt_keep=bad)
        assert info.value.param == "elastic.prompt_keep"


def test_a_prompt_too_short_to_prune_runs_and_reports_keep_one(llm, prompt_ids):
    # Under min_prompt_tokens nothing is pruned, so whatever keep is asked, the request runs and
    # reports the whole prompt, and an auto keep has nothing to choose; a long prompt at 0.5
    # reports 0.5.
    short = prompt_ids[:PRUNING.min_prompt_tokens - 1]
    outputs = llm.generate([{"prompt_token_ids": short}, {"prompt_token_ids": prompt_ids}], GREEDY,
                           use_tqdm=False, prompt_keep=0.5)
    assert [o.prompt_keep for o in outputs] == [1.0, 0.5]
    assert outputs[0].num_prompt_tokens_computed_in_full == len(short)
    llm.engine.add_request("auto", short, GREEDY, prompt_keep="auto")
    request = llm.engine.scheduler.requests["auto"]
    assert request.keep_options is None and request.prompt_keep == 1.0 and request.prune_plan is None
    llm.engine.abort_request("auto")
    while llm.engine.has_unfinished_requests():
        llm.engine.step()


def _run(engine) -> tuple[dict, dict]:
    """Step to the end: the finished outputs, and the kept positions the runner reported."""
    finished, kept = {}, {}
    while engine.has_unfinished_requests():
        _step(engine, finished, kept)
    return finished, kept


def _step(engine, finished: dict, kept: dict) -> None:
    scheduler_output = engine.scheduler.schedule()
    runner_output = engine.runner.execute(scheduler_output)
    kept.update(runner_output.kept_prompt_positions)
    for request in engine.scheduler.update_from_output(scheduler_output, runner_output):
        engine._on_new_token(request, runner_output, 0.0)
    for output in engine.outputs.outputs_for([s.request for s in scheduler_output.scheduled]):
        if output.finished:
            finished[output.request_id] = output
    engine.check_invariants()
