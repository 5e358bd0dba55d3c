"""Prefix caching in the KV manager: exact block ids, ref counts and counters, and every invariant
checked after every call."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

import engine.kv.kv_cache_manager as kv_cache_manager_module
from engine.kv.block_pool import BlockPoolError
from engine.kv.kv_cache_manager import KVCacheManager

PREFIX = list(range(100, 112))  # 3 full blocks of 4 tokens


class Checked:
    """A KVCacheManager whose invariants are checked after every method call."""

    def __init__(self, kv: KVCacheManager) -> None:
        self.kv = kv
        kv.check_invariants()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.kv, name)
        if not callable(attr):
            return attr

        def checked_call(*args: Any, **kwargs: Any) -> Any:
            result = attr(*args, **kwargs)
            self.kv.check_invariants()
            return result
        return checked_call


def make_kv(num_blocks: int = 16, block_size: int = 4, enable_prefix_caching: bool = True) -> Any:
    return Checked(KVCacheManager(num_blocks, block_size, enable_prefix_caching=enable_prefix_caching))


def admit(kv: Any, request_id: str, token_ids: Sequence[int]) -> int:
    """Admit a request the way the scheduler does: match its prefix, then allocate the whole prompt."""
    hit = kv.match_prefix(request_id, token_ids)
    assert kv.allocate_slots(request_id, len(token_ids), token_ids)
    return hit


def ref_counts(kv: Any, block_ids: Sequence[int]) -> list[int]:
    return [kv.pool.ref_count(b) for b in block_ids]


def is_cached(kv: Any, block_ids: Sequence[int]) -> list[bool]:
    return [kv.pool.block_hash(b) is not None for b in block_ids]


def snapshot(kv: Any) -> tuple:
    blocks = range(kv.pool.num_blocks)
    return kv.num_free_blocks, kv.pool.num_cached_blocks, ref_counts(kv, blocks), is_cached(kv, blocks)


def test_shared_prefix_hits_the_same_blocks():
    kv = make_kv()
    assert admit(kv, "a", PREFIX + [1, 2]) == 0
    assert kv.block_table("a") == [0, 1, 2, 3]
    assert is_cached(kv, [0, 1, 2, 3]) == [True, True, True, False]  # only full blocks are cached
    b = PREFIX + [7, 8, 9]
    assert kv.match_prefix("b", b) == 12
    assert kv.block_table("b") == [0, 1, 2]
    assert ref_counts(kv, [0, 1, 2, 3]) == [2, 2, 2, 1]
    assert kv.allocate_slots("b", len(b), b)
    assert kv.block_table("b") == [0, 1, 2, 4]
    assert kv.pool.num_used_blocks == 5 and kv.num_free_blocks == 11


def test_hit_leaves_at_least_one_token_to_compute():
    kv = make_kv()
    admit(kv, "a", PREFIX)  # exactly 3 full blocks, all cached
    assert kv.pool.num_cached_blocks == 3
    assert kv.match_prefix("b", PREFIX) == 8  # (12 - 1) // 4 = 2 blocks: the last token is computed
    assert kv.match_prefix("c", PREFIX + [5]) == 12
    assert kv.match_prefix("d", PREFIX[:4]) == 0
    assert kv.match_prefix("e", []) == 0
    assert kv.request_ids() == {"a", "b", "c"}
    # b recomputes block 2 into a block of its own, which stays uncached: the hash names a's.
    assert kv.allocate_slots("b", 12, PREFIX)
    assert kv.block_table("b") == [0, 1, 3]
    assert is_cached(kv, [3]) == [False] and kv.pool.cached_block(kv.pool.block_hash(2)) == 2


def test_different_prefix_misses_and_installs_nothing():
    kv = make_kv()
    admit(kv, "a", PREFIX + [1])
    assert kv.match_prefix("b", [999] + PREFIX[1:] + [1]) == 0
    assert kv.request_ids() == {"a"} and kv.block_table("b") == []
    assert ref_counts(kv, [0, 1, 2, 3]) == [1, 1, 1, 1]


def test_hash_is_chained_on_the_prefix():
    x, y, z = [1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]
    kv = make_kv()
    admit(kv, "a", x + y + [0])
    assert kv.match_prefix("b", z + y + [0]) == 0  # block y after another block is other KV
    assert kv.match_prefix("c", x + z + [0]) == 4  # the first block still matches
    assert kv.block_table("c") == [0]


def test_two_sharers_ref_counts_and_freeing_one_keeps_the_block():
    kv = make_kv()
    admit(kv, "a", PREFIX + [1])
    assert admit(kv, "b", PREFIX + [2]) == 12
    assert kv.block_table("a") == [0, 1, 2, 3] and kv.block_table("b") == [0, 1, 2, 4]
    kv.free("a")
    assert ref_counts(kv, [0, 1, 2, 3, 4]) == [1, 1, 1, 0, 1]
    assert kv.pool.num_used_blocks == 4
    kv.free("b")
    assert kv.usage == 0.0 and kv.num_free_blocks == 16
    assert kv.pool.num_cached_blocks == 3  # the prefix stays cached, free and evictable


def test_freed_cached_blocks_are_reused():
    kv = make_kv()
    admit(kv, "a", PREFIX + [1])
    kv.free("a")
    assert kv.num_free_blocks == 16
    assert kv.match_prefix("b", PREFIX + [2]) == 12
    assert kv.block_table("b") == [0, 1, 2]
    assert kv.num_free_blocks == 13  # the hit blocks are no longer free (or evictable)
    assert ref_counts(kv, [0, 1, 2]) == [1, 1, 1]


def test_empty_blocks_go_before_evicting_cached_ones_and_the_tail_goes_first():
    kv = make_kv(num_blocks=6)
    admit(kv, "a", PREFIX + [1])  # blocks 0..3, 0..2 cached
    kv.free("a")  # tail first: empty [4, 5, 3], evictable (oldest first) [2, 1, 0]
    assert kv.allocate_slots("x", 12)
    assert kv.block_table("x") == [4, 5, 3] and kv.pool.num_cached_blocks == 3
    assert kv.allocate_slots("y", 4)
    assert kv.block_table("y") == [2]  # evicts a's tail block first
    assert kv.pool.num_cached_blocks == 2 and kv.pool.block_hash(2) is None
    assert kv.match_prefix("a2", PREFIX + [1]) == 8  # the head of the prefix survives


def test_eviction_is_least_recently_freed_first():
    kv = make_kv(num_blocks=6, block_size=2)
    a, b = [1, 2, 3, 4], [5, 6, 7, 8]
    admit(kv, "a", a)  # [0, 1], both full and cached
    admit(kv, "b", b)  # [2, 3]
    kv.free("a")
    kv.free("b")  # evictable, oldest first: 1, 0, 3, 2
    assert kv.match_prefix("c", a + [9]) == 4  # a's blocks are used again...
    kv.free("c")  # ...and freed again, so now the most recent: 3, 2, 1, 0
    evicted = []
    for i in range(6):
        assert kv.allocate_slots(f"n{i}", 1)
        evicted += kv.block_table(f"n{i}")
    assert evicted == [4, 5, 3, 2, 1, 0]  # the two empty blocks first, then the LRU
    assert kv.pool.num_cached_blocks == 0 and kv.num_free_blocks == 0
    assert not kv.allocate_slots("full", 1)


def test_caching_off_behaves_as_a_plain_fifo():
    kv = make_kv(enable_prefix_caching=False)
    assert admit(kv, "a", PREFIX + [1]) == 0
    assert kv.pool.num_cached_blocks == 0
    kv.free("a")  # free list: 4..15, then 3, 2, 1, 0
    assert admit(kv, "b", PREFIX + [1]) == 0
    assert kv.block_table("b") == [4, 5, 6, 7]
    assert kv.prefix_cache_queries_total == 0 and kv.prefix_cache_hits_total == 0


def test_failed_admission_after_a_hit_is_undone_by_free():
    kv = make_kv(num_blocks=6)
    admit(kv, "a", PREFIX + [1])
    kv.free("a")  # empty [4, 5, 3], evictable [2, 1, 0]
    assert kv.allocate_slots("x", 8)  # takes 4, 5
    before = snapshot(kv)
    b = PREFIX + list(range(20))  # 32 tokens: 8 blocks, 3 of them cached
    assert kv.match_prefix("b", b) == 12
    assert kv.num_free_blocks == 1
    assert not kv.allocate_slots("b", len(b), b)  # needs 5 more, 1 free: no change
    assert kv.block_table("b") == [0, 1, 2]
    kv.free("b")
    assert snapshot(kv) == before
    assert kv.match_prefix("b", b) == 12  # the matched blocks went back to the cache


def test_decode_registers_blocks_as_they_fill_hashing_each_once(monkeypatch):
    num_hashes = 0
    real_hash = kv_cache_manager_module.hash_block_tokens

    def counting_hash(parent_hash, token_ids):
        nonlocal num_hashes
        num_hashes += 1
        return real_hash(parent_hash, token_ids)
    monkeypatch.setattr(kv_cache_manager_module, "hash_block_tokens", counting_hash)

    kv = make_kv(num_blocks=32, block_size=4)
    token_ids = [1, 2, 3, 4, 5]
    admit(kv, "a", token_ids)
    for token in range(6, 70):  # decode: one new token per step
        token_ids.append(token)
        assert kv.allocate_slots("a", len(token_ids), token_ids)
        num_full_blocks = len(token_ids) // 4
        table = kv.block_table("a")
        assert is_cached(kv, table) == [i < num_full_blocks for i in range(len(table))]
        assert num_hashes == num_full_blocks + 1  # each full block once, plus the miss at admission


def test_concurrently_computed_prefix_keeps_the_first_mapping():
    kv = make_kv()
    a = PREFIX + [1]
    b = PREFIX + [50, 51, 52, 53, 60]  # same 3 blocks, then a 4th full block of its own
    assert kv.match_prefix("a", a) == 0 and kv.match_prefix("b", b) == 0  # admitted together
    assert kv.allocate_slots("a", len(a), a)  # [0, 1, 2, 3]
    assert kv.allocate_slots("b", len(b), b)  # [4, 5, 6, 7, 8]
    assert is_cached(kv, [4, 5, 6, 7, 8]) == [False, False, False, True, False]
    assert [kv.pool.cached_block(kv.pool.block_hash(i)) for i in range(3)] == [0, 1, 2]
    # The chain goes on through a's blocks into b's 4th block: both hold the same KV.
    assert kv.match_prefix("c", PREFIX + [50, 51, 52, 53, 70]) == 16
    assert kv.block_table("c") == [0, 1, 2, 7]
    kv.free("b")  # b's uncached copies become empty, its cached block stays shared
    assert ref_counts(kv, [4, 5, 6, 7, 8]) == [0, 0, 0, 1, 0]


def test_reset_prefix_cache_forgets_free_blocks_only():
    kv = make_kv()
    admit(kv, "a", PREFIX + [1])
    admit(kv, "b", [1, 2, 3, 4, 5])  # block 4 cached, in use
    kv.free("a")
    assert kv.pool.num_cached_blocks == 4
    assert kv.reset_prefix_cache()
    assert kv.pool.num_cached_blocks == 1 and kv.num_free_blocks == 14
    assert kv.match_prefix("a2", PREFIX + [1]) == 0
    assert not kv.reset_prefix_cache()  # b's block is in use: it keeps its hash
    assert kv.match_prefix("c", [1, 2, 3, 4, 9]) == 4
    kv.free("b")
    kv.free("c")
    assert kv.reset_prefix_cache() and kv.pool.num_cached_blocks == 0


def test_counters_count_looked_up_and_hit_tokens_of_successful_admissions():
    kv = make_kv(num_blocks=4)
    admit(kv, "a", PREFIX + [1])  # 13 looked up, 0 hit
    assert (kv.prefix_cache_queries_total, kv.prefix_cache_hits_total) == (13, 0)
    kv.free("a")
    assert kv.match_prefix("b", PREFIX + [2, 3]) == 12
    assert (kv.prefix_cache_queries_total, kv.prefix_cache_hits_total) == (13, 0)  # not admitted yet
    assert kv.allocate_slots("b", 14, PREFIX + [2, 3])
    assert (kv.prefix_cache_queries_total, kv.prefix_cache_hits_total) == (27, 12)
    # A request that cannot be admitted looks up again every step: a failed admission counts nothing.
    assert kv.match_prefix("c", [7] * 30) == 0
    assert not kv.allocate_slots("c", 30, [7] * 30)
    kv.free("c")
    assert (kv.prefix_cache_queries_total, kv.prefix_cache_hits_total) == (27, 12)
    kv.free("b")
    assert kv.match_prefix("d", [7] * 5) == 0 and kv.allocate_slots("d", 5, [7] * 5)  # a miss counts its tokens
    assert (kv.prefix_cache_queries_total, kv.prefix_cache_hits_total) == (32, 12)


def test_match_prefix_refuses_a_request_that_holds_blocks():
    kv = make_kv()
    admit(kv, "a", PREFIX + [1])
    with pytest.raises(BlockPoolError, match="already holds blocks"):
        kv.match_prefix("a", PREFIX + [1])


def test_allocate_slots_refuses_token_ids_shorter_than_the_slots():
    kv = make_kv()
    with pytest.raises(ValueError, match="3 token ids given for 8 slots"):
        kv.allocate_slots("a", 8, [1, 2, 3])
    assert kv.request_ids() == set() and kv.num_free_blocks == 16
