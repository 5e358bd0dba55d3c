"""Fixed-size KV blocks: a free list and a reference count per block.

Invariants (checked by `check_invariants`, which the tests call after every step):
    num_free_blocks + num_used_blocks == num_blocks
    a block is on the free list  <=>  its ref count is 0
    no block is on the free list twice
"""

from __future__ import annotations

from collections import deque


class BlockPoolError(RuntimeError):
    """A bookkeeping bug: double free, or allocating more blocks than are free."""


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"a block pool needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._ref_counts = [0] * num_blocks

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, 0 to 1."""
        return self.num_used_blocks / self.num_blocks

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def allocate(self, num_blocks: int) -> list[int]:
        if num_blocks > len(self._free):
            raise BlockPoolError(f"asked for {num_blocks} blocks, {len(self._free)} free")
        block_ids = [self._free.popleft() for _ in range(num_blocks)]
        for block_id in block_ids:
            self._ref_counts[block_id] = 1
        return block_ids

    def free(self, block_ids: list[int]) -> None:
        """Drop one reference to each block; a block whose count reaches 0 is free again."""
        for block_id in block_ids:
            if self._ref_counts[block_id] <= 0:
                raise BlockPoolError(f"double free of block {block_id}")
            self._ref_counts[block_id] -= 1
            if self._ref_counts[block_id] == 0:
                self._free.append(block_id)

    def check_invariants(self) -> None:
        free = set(self._free)
        assert len(free) == len(self._free), "a block is on the free list twice"
        assert all((count == 0) == (block in free) for block, count in enumerate(self._ref_counts)), \
            "free list and ref counts disagree"
        assert self.num_free_blocks + self.num_used_blocks == self.num_blocks
