"""Randomized prefix-caching stress: many requests sharing a few prefixes, chunked prefills, decodes,
preemptions, finishes and cache resets, with the invariants checked after every operation.

Besides the bookkeeping invariants, the test models what each KV slot holds: computing position p
of a request writes "the KV of token_ids[:p + 1]" into its slot.  A prefix-cache hit must only hand
out slots holding exactly the KV of the hitting request's own prefix, and no request may ever find
its computed KV overwritten by another.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass

import pytest

from engine.kv.kv_cache_manager import KVCacheManager, cdiv

VOCAB = 6  # tiny, so random suffixes collide and blocks are shared by chance too


@dataclass
class Running:
    token_ids: list[int]
    num_computed_tokens: int


class FifoReference:
    """The block manager before prefix caching: a FIFO free list, tables freed tail first."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.free_list = deque(range(num_blocks))
        self.tables: dict[str, list[int]] = {}

    def allocate_slots(self, request_id: str, num_total_tokens: int) -> bool:
        needed = max(0, cdiv(num_total_tokens, self.block_size) - len(self.tables.get(request_id, [])))
        if needed > len(self.free_list):
            return False
        if needed:
            self.tables.setdefault(request_id, []).extend(self.free_list.popleft() for _ in range(needed))
        return True

    def free(self, request_id: str) -> None:
        self.free_list.extend(reversed(self.tables.pop(request_id, [])))


class Simulation:
    def __init__(self, seed: int, enable_prefix_caching: bool, num_blocks: int = 24, block_size: int = 4):
        self.rng = random.Random(seed)
        self.block_size = block_size
        self.kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching=enable_prefix_caching)
        self.reference = None if enable_prefix_caching else FifoReference(num_blocks, block_size)
        self.prefixes = [self.random_tokens(n) for n in (4, 9, 13)]
        self.slot_contents: dict[int, tuple[int, ...]] = {}  # slot -> the token prefix its KV is for
        self.running: dict[str, Running] = {}
        self.waiting: dict[str, list[int]] = {}  # preempted (or refused) requests, tokens kept
        self.num_requests = 0
        self.num_hit_tokens = 0
        self.num_queried_tokens = 0

    def random_tokens(self, n: int) -> list[int]:
        return [self.rng.randrange(VOCAB) for _ in range(n)]

    def slot(self, request_id: str, position: int) -> int:
        block_table = self.kv.block_table(request_id)
        return block_table[position // self.block_size] * self.block_size + position % self.block_size

    # ---- operations --------------------------------------------------------------------------

    def admit(self) -> None:
        if self.waiting and self.rng.random() < 0.5:
            request_id = self.rng.choice(sorted(self.waiting))
            token_ids = self.waiting.pop(request_id)
        else:
            request_id, token_ids = f"r{self.num_requests}", self.new_prompt()
            self.num_requests += 1
        before = (self.kv.num_free_blocks, self.kv.pool.num_cached_blocks)
        hit = self.kv.match_prefix(request_id, token_ids)
        self.check_hit(request_id, token_ids, hit)
        num_new = self.rng.randint(1, len(token_ids) - hit)
        if self.allocate(request_id, hit + num_new, token_ids):
            self.num_queried_tokens += len(token_ids)  # only the admission that succeeds counts
            self.num_hit_tokens += hit
            self.running[request_id] = Running(token_ids, hit)
            self.compute(request_id, num_new)
        else:
            self.free(request_id)
            assert (self.kv.num_free_blocks, self.kv.pool.num_cached_blocks) == before
            self.waiting[request_id] = token_ids

    def new_prompt(self) -> list[int]:
        if self.running and self.rng.random() < 0.2:  # a follow-up turn: a whole earlier request
            base = list(self.running[self.rng.choice(sorted(self.running))].token_ids)
        else:
            base = list(self.rng.choice(self.prefixes))
        return base + self.random_tokens(self.rng.randint(1 if not base else 0, 9))

    def step(self) -> None:
        request_id = self.rng.choice(sorted(self.running))
        request = self.running[request_id]
        if request.num_computed_tokens == len(request.token_ids):
            request.token_ids.append(self.rng.randrange(VOCAB))  # the token sampled last step
        num_new = self.rng.randint(1, len(request.token_ids) - request.num_computed_tokens)
        if self.allocate(request_id, request.num_computed_tokens + num_new, request.token_ids):
            self.compute(request_id, num_new)
        else:
            self.preempt(self.rng.choice(sorted(self.running)))

    def preempt(self, request_id: str) -> None:
        self.free(request_id)
        self.waiting[request_id] = self.running.pop(request_id).token_ids

    def finish(self) -> None:
        request_id = self.rng.choice(sorted(self.running))
        self.free(request_id)
        del self.running[request_id]

    def reset(self) -> None:
        had_evictable = self.kv.pool.num_cached_blocks > sum(
            self.kv.pool.block_hash(b) is not None for b in range(self.kv.pool.num_blocks)
            if self.kv.pool.ref_count(b) > 0)
        assert self.kv.reset_prefix_cache() == had_evictable

    # ---- the manager, mirrored into the reference when caching is off -------------------------

    def allocate(self, request_id: str, num_total_tokens: int, token_ids: list[int]) -> bool:
        ok = self.kv.allocate_slots(request_id, num_total_tokens, token_ids)
        if self.reference is not None:
            assert self.reference.allocate_slots(request_id, num_total_tokens) == ok
        return ok

    def free(self, request_id: str) -> None:
        self.kv.free(request_id)
        if self.reference is not None:
            self.reference.free(request_id)

    def compute(self, request_id: str, num_new: int) -> None:
        """The runner writes the KV of the scheduled positions into the request's slots."""
        request = self.running[request_id]
        for position in range(request.num_computed_tokens, request.num_computed_tokens + num_new):
            self.slot_contents[self.slot(request_id, position)] = tuple(request.token_ids[:position + 1])
        request.num_computed_tokens += num_new

    # ---- checks ------------------------------------------------------------------------------

    def check_hit(self, request_id: str, token_ids: list[int], hit: int) -> None:
        assert hit % self.block_size == 0 and (hit == 0 or hit < len(token_ids))
        assert len(self.kv.block_table(request_id)) == hit // self.block_size
        for position in range(hit):
            assert self.slot_contents[self.slot(request_id, position)] == tuple(token_ids[:position + 1]), \
                f"{request_id} was handed KV of another prefix at position {position}"

    def check(self) -> None:
        self.kv.check_invariants()
        for request_id, request in self.running.items():
            for position in range(request.num_computed_tokens):
                assert self.slot_contents[self.slot(request_id, position)] == \
                    tuple(request.token_ids[:position + 1]), f"{request_id}'s KV was overwritten"
        if self.reference is not None:
            assert {r: self.kv.block_table(r) for r in self.kv.request_ids()} == self.reference.tables
            assert self.kv.num_free_blocks == len(self.reference.free_list)
        used = self.kv.pool.num_used_blocks
        assert self.kv.usage == used / self.kv.pool.num_blocks
        assert self.kv.num_free_blocks + used == self.kv.pool.num_blocks

    def run(self, num_ops: int) -> None:
        for _ in range(num_ops):
            roll = self.rng.random()
            if not self.running or roll < 0.3:
                self.admit()
            elif roll < 0.85:
                self.step()
            elif roll < 0.99:
                self.finish()
            else:
                self.reset()
            self.check()
        for request_id in sorted(self.running):
            self.free(request_id)
        self.running.clear()
        self.check()
        assert self.kv.usage == 0.0 and self.kv.num_free_blocks == self.kv.pool.num_blocks
        enabled = self.kv.enable_prefix_caching
        assert self.kv.prefix_cache_queries_total == (self.num_queried_tokens if enabled else 0)
        assert self.kv.prefix_cache_hits_total == self.num_hit_tokens


@pytest.mark.parametrize("seed", range(6))
def test_random_requests_sharing_prefixes(seed):
    simulation = Simulation(seed, enable_prefix_caching=True)
    simulation.run(1500)
    assert simulation.num_hit_tokens > 0  # the test exercised sharing


@pytest.mark.parametrize("seed", range(2))
def test_caching_off_matches_the_fifo_manager_exactly(seed):
    simulation = Simulation(seed, enable_prefix_caching=False)
    simulation.run(1500)
    assert simulation.num_hit_tokens == 0
