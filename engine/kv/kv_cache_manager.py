"""Per-request block tables over a BlockPool, and the slots a step writes.

A request with n tokens of KV holds ceil(n / block_size) blocks; token position p lives at
    slot = block_table[p // block_size] * block_size + p % block_size
"""

from __future__ import annotations

from engine.kv.block_pool import BlockPool


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self._block_tables: dict[str, list[int]] = {}

    @property
    def usage(self) -> float:
        return self.pool.usage

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def block_table(self, request_id: str) -> list[int]:
        return self._block_tables.get(request_id, [])

    def num_blocks_needed(self, request_id: str, num_total_tokens: int) -> int:
        """Blocks to add so that the request's table covers num_total_tokens positions."""
        return max(0, cdiv(num_total_tokens, self.block_size) - len(self.block_table(request_id)))

    def allocate_slots(self, request_id: str, num_total_tokens: int) -> bool:
        """Grow the request's table to cover num_total_tokens positions; False (and no change)
        if the pool has too few free blocks."""
        needed = self.num_blocks_needed(request_id, num_total_tokens)
        if needed > self.pool.num_free_blocks:
            return False
        if needed:
            self._block_tables.setdefault(request_id, []).extend(self.pool.allocate(needed))
        return True

    def free(self, request_id: str) -> None:
        block_ids = self._block_tables.pop(request_id, None)
        if block_ids:
            # Free in reverse so the tail blocks, least likely shared later, go back first.
            self.pool.free(block_ids[::-1])

    def request_ids(self) -> set[str]:
        return set(self._block_tables)

    def check_invariants(self) -> None:
        self.pool.check_invariants()
        held = [b for table in self._block_tables.values() for b in table]
        assert len(held) == len(set(held)), "a block is in two block tables"
        assert len(held) == self.pool.num_used_blocks, "used blocks not held by any request"
