"""KV groups of a model cut at prune layers: every table grows together, each pool keeps
free + used == total, a deep group never caches a pruned request's blocks, group 0 (A) caches as
ever."""

from __future__ import annotations

from engine.kv.kv_cache_groups import KVCacheGroups
from engine.kv.kv_cache_manager import KVCacheManager
from engine.prompt_pruning import PrunePlan

BLOCK = 4


def plan_for(num_prompt: int, num_kept: int, window: int = 4) -> PrunePlan:
    return PrunePlan(num_prompt, (num_kept,), window, fractions=(0.5,))


def check(kv: KVCacheGroups, plans: dict[str, PrunePlan | None]) -> None:
    kv.check_invariants(plans)
    for pool in (kv.full.pool, kv.stages[0].pool):
        assert pool.num_free_blocks + pool.num_used_blocks == pool.num_blocks


def test_unpruned_request_mirrors_group_a_in_group_b():
    kv = KVCacheGroups.create(16, BLOCK)
    tokens = list(range(1, 14))
    assert kv.allocate_slots("a", 13, tokens)
    assert len(kv.block_table("a")) == len(kv.kept_block_tables("a")[0]) == 4
    check(kv, {"a": None})
    # Both groups registered the 3 full blocks under the same keys: a second request hits in both.
    assert kv.full.pool.num_cached_blocks == kv.stages[0].pool.num_cached_blocks == 3
    assert kv.match_prefix("b", tokens) == 12
    check(kv, {"a": None, "b": None})


def test_pruned_request_keeps_group_b_to_the_kept_tokens_and_never_caches_it():
    kv = KVCacheGroups.create(16, BLOCK)
    plan = plan_for(num_prompt=20, num_kept=6)
    tokens = list(range(1, 25))
    assert kv.allocate_slots("p", 12, tokens, plan=plan)  # stage A: group B holds nothing yet
    assert len(kv.block_table("p")) == 3 and kv.kept_block_tables("p")[0] == []
    assert kv.allocate_slots("p", 21, tokens, plan=plan)  # the stage-B step: K + 1 output token
    assert len(kv.block_table("p")) == 6 and len(kv.kept_block_tables("p")[0]) == 2  # 7 kept tokens
    check(kv, {"p": plan})
    assert kv.full.pool.num_cached_blocks == 5 and kv.stages[0].pool.num_cached_blocks == 0
    kv.free("p")
    check(kv, {})
    assert kv.full.pool.num_used_blocks == kv.stages[0].pool.num_used_blocks == 0


def test_both_groups_grow_or_neither():
    kv = KVCacheGroups(KVCacheManager(8, BLOCK), [KVCacheManager(2, BLOCK)])
    tokens = list(range(1, 13))
    assert not kv.allocate_slots("a", 12, tokens)  # group B is short: group A must not change
    assert kv.block_table("a") == [] and kv.full.pool.num_cached_blocks == 0
    assert kv.allocate_slots("p", 12, tokens, plan=plan_for(num_prompt=12, num_kept=5))
    check(kv, {"p": plan_for(12, 5)})


def test_group_a_hits_do_not_depend_on_pruning():
    """Two requests sharing a 16-token prefix: the second's group-A hit is the same whether
    either prunes; a pruned request's hit stops before its scoring window."""
    shared = list(range(100, 116))
    first, second = shared + [1, 2, 3, 4, 5], shared + [6, 7, 8, 9, 10, 11, 12, 13]
    hits = {}
    for prunes in (False, True):
        kv = KVCacheGroups.create(32, BLOCK)
        plans = {name: plan_for(len(t), 8) if prunes else None for name, t in (("1", first), ("2", second))}
        assert kv.match_prefix("1", first, plan=plans["1"]) == 0
        assert kv.allocate_slots("1", len(first), first, plan=plans["1"])
        hits[prunes] = kv.match_prefix("2", second, plan=plans["2"])
        assert kv.allocate_slots("2", len(second), second, plan=plans["2"])
        check(kv, plans)
        assert kv.prefix_cache_hits_total == hits[prunes]
    assert hits == {False: 16, True: 16}
    kv = KVCacheGroups.create(32, BLOCK)
    assert kv.allocate_slots("1", len(first), first)
    assert kv.match_prefix("3", shared + [1], plan=plan_for(17, 8, window=4)) == 12  # window starts at 13


def test_an_unpruned_hit_is_the_shorter_of_the_two_groups():
    """After a pruned request, group A holds its prompt but group B does not: an unpruned request
    needs the deep layers' KV too, so it computes the prompt again (its group-A hit is undone)."""
    kv = KVCacheGroups.create(32, BLOCK)
    tokens = list(range(1, 22))
    assert kv.allocate_slots("p", 21, tokens, plan=plan_for(21, 8))
    assert kv.match_prefix("u", tokens) == 0
    assert kv.block_table("u") == [] and kv.kept_block_tables("u")[0] == []
    check(kv, {"p": plan_for(21, 8)})


def test_one_group_behaves_as_a_single_manager():
    kv = KVCacheGroups(KVCacheManager(8, BLOCK))
    assert kv.num_stages == 0
    assert kv.allocate_slots("a", 9, list(range(9)))
    assert kv.kept_block_tables("a") == [] and len(kv.block_table("a")) == 3
    kv.check_invariants({"a": None})


def test_two_stages_keep_nested_counts_and_free_every_pool():
    """Progressive pruning: group 1 holds K_1 kept tokens, group 2 K_2 <= K_1, both only from the
    stage-B step on; every pool frees to empty."""
    kv = KVCacheGroups.create(32, BLOCK, num_stages=2)
    plan = PrunePlan(40, (20, 9), 4, fractions=(0.2, 0.5))
    tokens = list(range(1, 45))
    assert kv.allocate_slots("p", 24, tokens, plan=plan)  # stage A
    assert [len(t) for t in kv.kept_block_tables("p")] == [0, 0]
    assert kv.allocate_slots("p", 41, tokens, plan=plan)  # stage B: K_s + 1 output token each
    assert len(kv.block_table("p")) == 11 and [len(t) for t in kv.kept_block_tables("p")] == [6, 3]
    kv.check_invariants({"p": plan})
    assert kv.match_prefix("u", tokens[:40]) == 0  # the deep groups hold no full prompt to share
    assert [pool.num_cached_blocks for pool in (kv.stages[0].pool, kv.stages[1].pool)] == [0, 0]
    kv.free("p")
    kv.free("u")
    assert all(m.pool.num_used_blocks == 0 for m in kv.managers)
