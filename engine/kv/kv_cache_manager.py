"""Per-request block tables over a BlockPool, and automatic prefix caching of full blocks.

A request with n tokens of KV holds ceil(n / block_size) blocks; token position p lives at
    slot = block_table[p // block_size] * block_size + p % block_size

Prefix caching: every full block is registered in the pool under its chained hash (block_hash.py)
as soon as the step that computes its KV is scheduled.  A new request (or a preempted one coming
back) first calls `match_prefix`, which installs the longest chain of cached blocks matching its
prompt as the start of its table, so it only computes the rest.  One request's table, in blocks:

    |<- matched at admission ->|<- registered by allocate_slots ->|<- not full ->|
    0                  num_matched_blocks                  num_cached_blocks   len(block_ids)

Registering in the step being scheduled is safe in this engine, even for a request admitted in
the same step: each layer writes all K/V of the step before any attention of that layer reads.
A block table may hold a block that other tables hold too; its ref count is the number of tables.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from engine.kv.block_hash import ROOT_BLOCK_HASH, BlockHash, hash_block_tokens, salted_root
from engine.kv.block_pool import BlockPool, BlockPoolError


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(slots=True)
class RequestBlocks:
    """The KV bookkeeping of one request, from its first block until `free`."""

    block_ids: list[int] = field(default_factory=list)
    # Chained hashes of the first len(block_hashes) full blocks, each computed once, so a decode
    # step costs O(1) amortized.  num_cached_blocks <= len(block_hashes) <= num_cached_blocks + 1.
    block_hashes: list[BlockHash] = field(default_factory=list)
    # Blocks [0, num_cached_blocks) were offered to the cache (registered, or left uncached
    # because another block already had their hash); a block is never offered twice.
    num_cached_blocks: int = 0
    # The parent of block 0's hash: ROOT_BLOCK_HASH, or the root salted with what else the KV
    # depends on (an elastic level), so that KV written under one salt never serves another.
    root_hash: BlockHash = ROOT_BLOCK_HASH


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks)
        self._requests: dict[str, RequestBlocks] = {}
        self.prefix_cache_queries_total = 0  # prompt tokens looked up at admission
        self.prefix_cache_hits_total = 0  # of which found cached
        # request id -> (tokens looked up, tokens hit) of a match_prefix not yet followed by a
        # successful allocate_slots.  A request that cannot be admitted looks up again every step;
        # only the lookup of the admission that succeeds is counted.
        self._pending_lookups: dict[str, tuple[int, int]] = {}

    @property
    def usage(self) -> float:
        return self.pool.usage

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can get, evictable cached blocks included."""
        return self.pool.num_free_blocks

    def block_table(self, request_id: str) -> list[int]:
        state = self._requests.get(request_id)
        return state.block_ids if state is not None else []

    def request_ids(self) -> set[str]:
        return set(self._requests)

    def num_blocks_needed(self, request_id: str, num_total_tokens: int) -> int:
        """Blocks to add so that the request's table covers num_total_tokens positions."""
        return max(0, cdiv(num_total_tokens, self.block_size) - len(self.block_table(request_id)))

    # ---- admission ---------------------------------------------------------------------------

    def match_prefix(self, request_id: str, token_ids: Sequence[int], cache_salt: bytes = b"",
                     max_num_tokens: int | None = None) -> int:
        """For a request holding no blocks, share the longest chain of cached full blocks that
        matches the start of token_ids and install it as the start of its block table.  Returns
        the number of tokens whose KV is thereby computed (a multiple of block_size, at most
        max_num_tokens if given).  If the request then cannot get its other blocks,
        `free(request_id)` undoes this."""
        if request_id in self._requests:
            raise BlockPoolError(f"request {request_id!r} already holds blocks: match_prefix is "
                                 "only for admission")
        if not self.enable_prefix_caching:
            return 0
        self._pending_lookups[request_id] = (len(token_ids), 0)
        state = RequestBlocks(root_hash=salted_root(cache_salt))
        # Leave at least one token to compute: its logits sample the request's next token.
        max_num_matched_blocks = max(0, len(token_ids) - 1) // self.block_size
        if max_num_tokens is not None:
            max_num_matched_blocks = min(max_num_matched_blocks, max_num_tokens // self.block_size)
        for index in range(max_num_matched_blocks):
            block_id = self.pool.cached_block(self._block_hash(state, token_ids, index))
            if block_id is None:
                break
            state.block_ids.append(block_id)
        if not state.block_ids:
            return 0  # install nothing: a miss leaves no state behind, so it needs no free
        self.pool.share(state.block_ids)
        state.num_cached_blocks = len(state.block_ids)
        self._requests[request_id] = state
        num_hit_tokens = len(state.block_ids) * self.block_size
        self._pending_lookups[request_id] = (len(token_ids), num_hit_tokens)
        return num_hit_tokens

    # ---- growth ------------------------------------------------------------------------------

    def allocate_slots(self, request_id: str, num_total_tokens: int,
                       token_ids: Sequence[int] | None = None, cache_salt: bytes = b"") -> bool:
        """Grow the request's table to cover num_total_tokens positions; False (and no change) if
        the pool has too few free blocks.  With caching on and the request's token_ids given,
        register every block that is full at num_total_tokens: the step being scheduled computes
        their KV, so later requests may share them.  `cache_salt` names what else the KV depends
        on; it is read when the request gets its first block (a prefix hit fixed it already)."""
        if token_ids is not None and len(token_ids) < num_total_tokens:
            raise ValueError(f"{len(token_ids)} token ids given for {num_total_tokens} slots")
        needed = self.num_blocks_needed(request_id, num_total_tokens)
        if needed > self.pool.num_free_blocks:
            return False
        self._count_lookup(request_id)
        state = self._requests.get(request_id)
        if state is None:
            if not needed:
                return True
            state = self._requests[request_id] = RequestBlocks(root_hash=salted_root(cache_salt))
        state.block_ids.extend(self.pool.allocate(needed))
        if self.enable_prefix_caching and token_ids is not None:
            self._cache_full_blocks(state, num_total_tokens, token_ids)
        return True

    def _count_lookup(self, request_id: str) -> None:
        lookup = self._pending_lookups.pop(request_id, None)
        if lookup is not None:
            self.prefix_cache_queries_total += lookup[0]
            self.prefix_cache_hits_total += lookup[1]

    def _cache_full_blocks(self, state: RequestBlocks, num_total_tokens: int,
                           token_ids: Sequence[int]) -> None:
        num_full_blocks = num_total_tokens // self.block_size
        for index in range(state.num_cached_blocks, num_full_blocks):
            block_hash = self._block_hash(state, token_ids, index)
            self.pool.cache_block(state.block_ids[index], block_hash)  # False: stays uncached
        state.num_cached_blocks = max(state.num_cached_blocks, num_full_blocks)

    def _block_hash(self, state: RequestBlocks, token_ids: Sequence[int], index: int) -> BlockHash:
        """The chained hash of full block `index`, computed on first use and kept in
        block_hashes; blocks are always hashed in order, so index <= len(block_hashes)."""
        block_hashes = state.block_hashes
        if index == len(block_hashes):
            parent_hash = block_hashes[-1] if block_hashes else state.root_hash
            start = index * self.block_size
            block_hashes.append(hash_block_tokens(parent_hash, token_ids[start:start + self.block_size]))
        return block_hashes[index]

    # ---- release -----------------------------------------------------------------------------

    def free(self, request_id: str) -> None:
        """Drop the request's blocks (finish, abort, preemption, or a failed admission).  Tail
        first, so its cached blocks are evicted tail first: a tail is shared less than a head."""
        self._pending_lookups.pop(request_id, None)
        state = self._requests.pop(request_id, None)
        if state is not None:
            self.pool.free(reversed(state.block_ids))

    def reset_prefix_cache(self) -> bool:
        """Forget the hashes of all free cached blocks; True if there were any."""
        return self.pool.reset_prefix_cache()

    # ---- checks ------------------------------------------------------------------------------

    def check_invariants(self) -> None:
        self.pool.check_invariants()
        num_holders: Counter[int] = Counter()
        for request_id, state in self._requests.items():
            assert len(set(state.block_ids)) == len(state.block_ids), f"{request_id} holds a block twice"
            assert state.num_cached_blocks <= len(state.block_hashes) <= state.num_cached_blocks + 1
            num_holders.update(state.block_ids)
            for block_id, block_hash in zip(state.block_ids, state.block_hashes):
                assert self.pool.block_hash(block_id) in (None, block_hash), \
                    f"{request_id}'s block {block_id} is cached under another prefix's hash"
        for block_id in range(self.pool.num_blocks):
            assert self.pool.ref_count(block_id) == num_holders[block_id], \
                f"block {block_id}: ref count {self.pool.ref_count(block_id)}, {num_holders[block_id]} tables"
        if not self.enable_prefix_caching:
            assert self.pool.num_cached_blocks == 0, "a block was cached with prefix caching off"
