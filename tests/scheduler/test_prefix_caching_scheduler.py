"""The real Scheduler with prefix caching on, driven by a fake runner: no torch, exact accounting.

The fake runner models what each KV slot holds: running positions [c, c + n) of a request writes
"the KV of all_token_ids[:p + 1]" into the slot of each position p.  Like the real model, it
writes every scheduled position of the step before anything reads; then every scheduled request
must find the KV of its own prefix in the slots of positions [0, c + n).  So a prefix hit that
hands out the wrong blocks, or a shared block overwritten by another request, fails the test.
"""

from __future__ import annotations

import random

from engine.kv.kv_cache_manager import KVCacheManager
from engine.request import Request
from engine.sampling_params import SamplingParams
from engine.scheduler.output import ModelRunnerOutput, SampledToken, ScheduledRequest, SchedulerOutput
from engine.scheduler.policy import FCFSPolicy
from engine.scheduler.scheduler import Scheduler

BLOCK_SIZE = 4
PREFIX = list(range(100, 112))  # 3 full blocks


def make_scheduler(num_blocks: int = 64, budget: int = 32, max_num_seqs: int = 8,
                   enable_prefix_caching: bool = True) -> Scheduler:
    kv = KVCacheManager(num_blocks, BLOCK_SIZE, enable_prefix_caching=enable_prefix_caching)
    return Scheduler(kv, FCFSPolicy(), max_num_batched_tokens=budget, max_num_seqs=max_num_seqs,
                     max_model_len=1024)


def make_request(request_id: str, prompt_token_ids: list[int], max_tokens: int = 3,
                 arrival: float = 0.0) -> Request:
    return Request(request_id=request_id, prompt_token_ids=list(prompt_token_ids),
                   sampling_params=SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                   max_tokens=max_tokens, arrival_time=arrival)


class FakeKVRunner:
    def __init__(self, seed: int = 0) -> None:
        self.slot_contents: dict[int, tuple[int, ...]] = {}
        self.rng = random.Random(seed)

    def run(self, output: SchedulerOutput) -> ModelRunnerOutput:
        for item in output.scheduled:
            for position in self.positions(item, start=item.num_computed_tokens):
                self.slot_contents[self.slot(item, position)] = self.prefix(item, position)
        for item in output.scheduled:
            for position in self.positions(item, start=0):
                assert self.slot_contents.get(self.slot(item, position)) == self.prefix(item, position), \
                    f"{item.request.request_id} reads another prefix's KV at position {position}"
        return ModelRunnerOutput(sampled={s.request.request_id: SampledToken(self.rng.randrange(1, 9))
                                          for s in output.scheduled if s.samples})

    @staticmethod
    def positions(item: ScheduledRequest, start: int) -> range:
        return range(start, item.num_computed_tokens + item.num_scheduled_tokens)

    @staticmethod
    def slot(item: ScheduledRequest, position: int) -> int:
        return item.block_ids[position // BLOCK_SIZE] * BLOCK_SIZE + position % BLOCK_SIZE

    @staticmethod
    def prefix(item: ScheduledRequest, position: int) -> tuple[int, ...]:
        return tuple(item.request.all_token_ids[:position + 1])


def step(scheduler: Scheduler, runner: FakeKVRunner) -> dict[str, ScheduledRequest]:
    """One engine step; returns this step's items by request id (block ids copied as they were)."""
    output = scheduler.schedule()
    items = {s.request.request_id: ScheduledRequest(s.request, s.num_computed_tokens, s.num_scheduled_tokens,
                                                    list(s.block_ids), s.samples) for s in output.scheduled}
    scheduler.update_from_output(output, runner.run(output))
    scheduler.kv.check_invariants()
    return items


def run_to_completion(scheduler: Scheduler, runner: FakeKVRunner, max_steps: int = 1000) -> None:
    for _ in range(max_steps):
        if not scheduler.has_unfinished_requests():
            break
        step(scheduler, runner)
    assert not scheduler.has_unfinished_requests()
    assert scheduler.kv.usage == 0.0 and scheduler.kv.request_ids() == set()
    assert scheduler.kv.num_free_blocks == scheduler.kv.pool.num_blocks


def test_second_request_starts_at_the_shared_prefix():
    scheduler, runner = make_scheduler(), FakeKVRunner()
    scheduler.add_request(make_request("a", PREFIX + [1, 2], arrival=0))
    first = step(scheduler, runner)["a"]
    assert (first.num_computed_tokens, first.num_scheduled_tokens) == (0, 14)
    scheduler.add_request(make_request("b", PREFIX + [5, 6, 7], arrival=1))
    items = step(scheduler, runner)
    assert (items["b"].num_computed_tokens, items["b"].num_scheduled_tokens) == (12, 3)
    assert items["b"].samples
    assert items["b"].block_ids[:3] == items["a"].block_ids[:3] == first.block_ids[:3]
    assert [scheduler.kv.pool.ref_count(b) for b in first.block_ids[:3]] == [2, 2, 2]
    assert scheduler.kv.prefix_cache_hits_total == 12
    assert scheduler.kv.prefix_cache_queries_total == 14 + 15
    run_to_completion(scheduler, runner)


def test_a_finished_request_leaves_its_prefix_cached():
    scheduler, runner = make_scheduler(), FakeKVRunner()
    scheduler.add_request(make_request("a", PREFIX + [1, 2], max_tokens=2))
    first = step(scheduler, runner)["a"]
    run_to_completion(scheduler, runner)
    scheduler.add_request(make_request("b", PREFIX + [5, 6, 7], arrival=1))
    b = step(scheduler, runner)["b"]
    assert (b.num_computed_tokens, b.num_scheduled_tokens) == (12, 3)
    assert b.block_ids[:3] == first.block_ids[:3]
    run_to_completion(scheduler, runner)


def test_requests_arriving_together_share_within_the_step():
    # a's full blocks are registered when its step is scheduled; b, admitted after it in the same
    # step, reads them in that step (each layer writes all K/V of the step before attention).
    scheduler, runner = make_scheduler(budget=32), FakeKVRunner()
    scheduler.add_request(make_request("a", PREFIX + [1, 2], arrival=0))
    scheduler.add_request(make_request("b", PREFIX + [5, 6, 7], arrival=1))
    items = step(scheduler, runner)
    assert (items["a"].num_computed_tokens, items["a"].num_scheduled_tokens) == (0, 14)
    assert (items["b"].num_computed_tokens, items["b"].num_scheduled_tokens) == (12, 3)
    run_to_completion(scheduler, runner)


def test_a_prompt_of_whole_blocks_recomputes_its_last_block():
    scheduler, runner = make_scheduler(), FakeKVRunner()
    scheduler.add_request(make_request("a", PREFIX + [1]))
    step(scheduler, runner)
    scheduler.add_request(make_request("b", PREFIX, arrival=1))
    b = step(scheduler, runner)["b"]
    assert (b.num_computed_tokens, b.num_scheduled_tokens) == (8, 4)  # the last token samples
    run_to_completion(scheduler, runner)


def test_caching_off_computes_every_token():
    scheduler, runner = make_scheduler(enable_prefix_caching=False), FakeKVRunner()
    scheduler.add_request(make_request("a", PREFIX + [1, 2]))
    step(scheduler, runner)
    scheduler.add_request(make_request("b", PREFIX + [5, 6, 7], arrival=1))
    b = step(scheduler, runner)["b"]
    assert (b.num_computed_tokens, b.num_scheduled_tokens) == (0, 15)
    assert scheduler.kv.prefix_cache_queries_total == 0 and scheduler.kv.prefix_cache_hits_total == 0
    run_to_completion(scheduler, runner)


def test_many_requests_sharing_prefixes_in_tiny_kv_all_finish():
    # 12 blocks of 4 tokens for 60 requests: chunked prefills, preemptions, evictions and hits mix.
    # A vocabulary of 3 makes equal blocks after different prefixes common: the chain must tell them apart.
    rng = random.Random(0)
    prefixes = [[rng.randrange(1, 4) for _ in range(n)] for n in (8, 10, 13)]
    scheduler, runner = make_scheduler(num_blocks=12, budget=8, max_num_seqs=4), FakeKVRunner(seed=1)
    for i in range(60):
        prompt = rng.choice(prefixes) + [rng.randrange(1, 4) for _ in range(rng.randint(0, 6))]
        scheduler.add_request(make_request(f"r{i}", prompt, max_tokens=rng.randint(1, 8), arrival=i))
    run_to_completion(scheduler, runner, max_steps=3000)
    assert scheduler.kv.prefix_cache_hits_total > 0
    assert scheduler.num_preemptions_total > 0


def test_a_request_scoring_its_prompt_skips_the_lookup_until_its_first_token():
    # Cached tokens have no logits to score, so such a request computes its whole prompt (vLLM
    # does the same); its own blocks are still cached for others.  Once its first token is out,
    # the prompt logprobs went with it: a recompute after a preemption may start from hits.
    scheduler, runner = make_scheduler(), FakeKVRunner()
    scheduler.add_request(make_request("a", PREFIX + [1, 2]))
    step(scheduler, runner)
    scored = make_request("b", PREFIX + [5, 6, 7], max_tokens=4, arrival=1)
    scored.sampling_params = SamplingParams(max_tokens=4, ignore_eos=True, prompt_logprobs=1)
    scheduler.add_request(scored)
    output = scheduler.schedule()
    [b] = [s for s in output.scheduled if s.request_id == "b"]
    assert (b.num_computed_tokens, b.num_scheduled_tokens) == (0, 15)
    assert b.new_request is not None and b.new_request.needs_prompt_logprobs
    scheduler.update_from_output(output, runner.run(output))
    assert scored.num_output_tokens == 1 and not scored.needs_prompt_logprobs
    scheduler._preempt(scored)
    assert "b" not in step(scheduler, runner)  # a victim waits a step
    restart = step(scheduler, runner)["b"]
    assert restart.num_computed_tokens == 12
    run_to_completion(scheduler, runner)
