"""Fixed-size KV blocks: a reference count per block, the free blocks, and the prefix cache index.

Every block is in exactly one of three states:

    used        ref count > 0, held by that many block tables; may have a hash (be cached)
    empty       ref count 0, no hash: its contents are worth nothing
    evictable   ref count 0, has a hash: its KV is still valid and a prefix-cache hit may take it
                back, until an allocation evicts it (dropping its hash)

Free blocks are the empty and the evictable ones.  `allocate` takes empty blocks first (FIFO), and
only then evicts the least recently freed evictable block.  With no hashes ever registered (prefix
caching off) every free block is empty and the pool behaves as a plain FIFO free list.

Invariants (checked by `check_invariants`, which the tests call after every step):
    num_free_blocks + num_used_blocks == num_blocks
    ref count 0  <=>  on exactly one of the empty queue and the evictable LRU
    on the evictable LRU  <=>  ref count 0 and has a hash
    cached_block(h) == b  <=>  block_hash(b) == h        (a hash names at most one block)
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable

from engine.kv.block_hash import BlockHash


class BlockPoolError(RuntimeError):
    """A KV bookkeeping bug: double free, allocating more blocks than are free, and the like."""


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"a block pool needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self._ref_counts = [0] * num_blocks
        self._empty: deque[int] = deque(range(num_blocks))
        # Keys only, least recently freed first: O(1) to evict the oldest, and O(1) to take a
        # block out of the middle when a prefix-cache hit reuses it.
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._block_hashes: list[BlockHash | None] = [None] * num_blocks
        self._cached_blocks: dict[BlockHash, int] = {}

    @property
    def num_free_blocks(self) -> int:
        """Empty plus evictable blocks: all can be handed out by `allocate`."""
        return len(self._empty) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks with a hash, used or evictable."""
        return len(self._cached_blocks)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use (ref count > 0), 0 to 1; evictable blocks count as free."""
        return self.num_used_blocks / self.num_blocks

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def block_hash(self, block_id: int) -> BlockHash | None:
        return self._block_hashes[block_id]

    # ---- allocation --------------------------------------------------------------------------

    def allocate(self, num_blocks: int) -> list[int]:
        """Hand out num_blocks blocks with ref count 1 and no hash: empty ones first, then
        evicted ones, least recently freed first."""
        if num_blocks > self.num_free_blocks:
            raise BlockPoolError(f"asked for {num_blocks} blocks, {self.num_free_blocks} free")
        block_ids = [self._take_free_block() for _ in range(num_blocks)]
        for block_id in block_ids:
            self._ref_counts[block_id] = 1
        return block_ids

    def _take_free_block(self) -> int:
        if self._empty:
            return self._empty.popleft()
        block_id, _ = self._evictable.popitem(last=False)
        self._uncache(block_id)
        return block_id

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one reference to each block, in the order given; a block whose count reaches 0
        is free again, and if cached it becomes the most recently freed evictable block."""
        for block_id in block_ids:
            if self._ref_counts[block_id] <= 0:
                raise BlockPoolError(f"double free of block {block_id}")
            self._ref_counts[block_id] -= 1
            if self._ref_counts[block_id] == 0:
                if self._block_hashes[block_id] is None:
                    self._empty.append(block_id)
                else:
                    self._evictable[block_id] = None

    # ---- prefix cache ------------------------------------------------------------------------

    def cached_block(self, block_hash: BlockHash) -> int | None:
        """The block holding the KV named by block_hash, used or evictable; None if none does."""
        return self._cached_blocks.get(block_hash)

    def share(self, block_ids: Iterable[int]) -> None:
        """Take one more reference to each cached block (a prefix-cache hit).  An evictable block
        becomes used again and can no longer be evicted."""
        for block_id in block_ids:
            if self._block_hashes[block_id] is None:
                raise BlockPoolError(f"block {block_id} is not cached, so it cannot be shared")
            if self._ref_counts[block_id] == 0:
                del self._evictable[block_id]
            self._ref_counts[block_id] += 1

    def cache_block(self, block_id: int, block_hash: BlockHash) -> bool:
        """Register a used full block under its hash so later requests can share it.  False, and
        nothing changes, if the hash already names another block (two requests computed the same
        prefix at once): the existing mapping stays, and this block stays uncached rather than
        being swapped out under the request that holds it."""
        if self._ref_counts[block_id] == 0:
            raise BlockPoolError(f"block {block_id} is free; only a used block can be cached")
        cached = self._cached_blocks.get(block_hash)
        if cached is not None:
            return cached == block_id
        if self._block_hashes[block_id] is not None:
            raise BlockPoolError(f"block {block_id} is already cached under another hash")
        self._cached_blocks[block_hash] = block_id
        self._block_hashes[block_id] = block_hash
        return True

    def reset_prefix_cache(self) -> bool:
        """Forget every evictable block's hash, making them empty; True if there were any.  Used
        blocks keep theirs: their KV is live, and their holders expect them to stay cached."""
        if not self._evictable:
            return False
        for block_id in self._evictable:
            self._uncache(block_id)
            self._empty.append(block_id)
        self._evictable.clear()
        return True

    def _uncache(self, block_id: int) -> None:
        block_hash = self._block_hashes[block_id]
        assert block_hash is not None
        del self._cached_blocks[block_hash]
        self._block_hashes[block_id] = None

    # ---- checks ------------------------------------------------------------------------------

    def check_invariants(self) -> None:
        empty = set(self._empty)
        assert len(empty) == len(self._empty), "a block is on the empty queue twice"
        assert not empty & self._evictable.keys(), "a block is both empty and evictable"
        for block_id, count in enumerate(self._ref_counts):
            assert count >= 0, f"block {block_id} has ref count {count}"
            is_free = block_id in empty or block_id in self._evictable
            assert (count == 0) == is_free, f"block {block_id}: ref count {count} but free={is_free}"
            is_cached = self._block_hashes[block_id] is not None
            assert (block_id in self._evictable) == (count == 0 and is_cached), \
                f"block {block_id} is on the wrong free structure"
        assert all(self._block_hashes[b] == h for h, b in self._cached_blocks.items()), \
            "a hash maps to a block that does not carry it"
        assert sum(h is not None for h in self._block_hashes) == len(self._cached_blocks), \
            "a block carries a hash that does not map to it"
        assert self.num_free_blocks + self.num_used_blocks == self.num_blocks
