import pytest

from engine.kv.block_pool import BlockPool, BlockPoolError
from engine.kv.kv_cache_manager import KVCacheManager


def test_allocate_and_free_keep_counts():
    pool = BlockPool(8)
    blocks = pool.allocate(3)
    assert blocks == [0, 1, 2]
    assert [pool.ref_count(b) for b in blocks] == [1, 1, 1]
    assert pool.num_free_blocks == 5 and pool.num_used_blocks == 3
    pool.check_invariants()
    pool.free(blocks)
    assert pool.num_free_blocks == 8 and pool.usage == 0.0
    pool.check_invariants()


def test_double_free_raises():
    pool = BlockPool(4)
    blocks = pool.allocate(1)
    pool.free(blocks)
    with pytest.raises(BlockPoolError, match="double free"):
        pool.free(blocks)


def test_over_allocation_raises_and_changes_nothing():
    pool = BlockPool(2)
    with pytest.raises(BlockPoolError):
        pool.allocate(3)
    assert pool.num_free_blocks == 2


def test_manager_grows_tables_by_block():
    kv = KVCacheManager(num_blocks=4, block_size=16)
    assert kv.allocate_slots("a", 1)
    assert kv.block_table("a") == [0]
    assert kv.allocate_slots("a", 16)  # still one block
    assert kv.block_table("a") == [0]
    assert kv.allocate_slots("a", 17)
    assert kv.block_table("a") == [0, 1]
    assert not kv.allocate_slots("b", 16 * 3)  # needs 3, only 2 free: no change
    assert kv.block_table("b") == [] and kv.num_free_blocks == 2
    kv.check_invariants()
    kv.free("a")
    assert kv.num_free_blocks == 4 and kv.request_ids() == set()
    kv.check_invariants()


def test_usage_is_a_fraction():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    kv.allocate_slots("a", 12)
    assert kv.usage == pytest.approx(0.3)
