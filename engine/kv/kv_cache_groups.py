"""The KV of a model cut at the prune layer l*: two groups of layers, each with its own block
pool and block tables (as vLLM's hybrid KV cache manager keeps one table per group).

    group A  layers [0, l*)   every token of every request, and the residual stream entering l*
    group B  layers [l*, L)   every token of an unpruned request; the kept prompt tokens and the
                              output tokens of a pruned one (engine/prompt_pruning.py)

Both groups index the same per-layer KV tensors: block b of group A is block b of layers below
l*, block b of group B block b of the layers from l*; the two never overlap, so each pool has all
num_blocks blocks.  Each pool keeps its own invariants (block_pool.py: free + used == total per
pool, ref counts == tables holding the block).  Across the groups, for every request:

    len(B table) == ceil(num_kept(tokens of A) / block_size)       (plan None: num_kept(c) == c)

because `allocate_slots` grows both tables together, or neither (it checks both pools first: a
block registered in the prefix cache is computed in the step being scheduled, so registering one
group's blocks for a step that then does not run would cache KV never written).

Prefix caching.  Group A caches and matches as without pruning, for pruned requests too: its
KV depends only on the tokens (and the elastic level's salt), so prefix-cache hits of group A do
not depend on who prunes.  Group B caches only unpruned requests' blocks, under the same keys
(they hold the full prompt's deep-layer KV); a pruned request's group-B blocks hold a subset of
its prompt and are never registered, and a pruned request never matches in group B, so group B
never serves kept tokens as if they were the full prompt.  An unpruned request's hit is the
shorter of the two groups' matches (their LRUs evict independently).  A pruned request's group-A
hit stops before its scoring window (PrunePlan.max_match).
"""

from __future__ import annotations

from collections.abc import Sequence

from engine.kv.block_pool import BlockPool
from engine.kv.kv_cache_manager import KVCacheManager, cdiv
from engine.prompt_pruning import PrunePlan


class KVCacheGroups:
    def __init__(self, full: KVCacheManager, kept: KVCacheManager | None = None) -> None:
        """`kept`: group B's manager; None for one group (pruning off), where B is A."""
        self.full = full
        self.kept = kept
        self.block_size = full.block_size

    @classmethod
    def create(cls, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
               two_groups: bool = True) -> KVCacheGroups:
        kept = KVCacheManager(num_blocks, block_size, enable_prefix_caching) if two_groups else None
        return cls(KVCacheManager(num_blocks, block_size, enable_prefix_caching), kept)

    @property
    def has_two_groups(self) -> bool:
        return self.kept is not None

    @property
    def pool(self) -> BlockPool:
        """Group A's pool: it holds every token, so it is the one that runs out first."""
        return self.full.pool

    @property
    def usage(self) -> float:
        return max(self.full.usage, self.kept.usage if self.kept else 0.0)

    @property
    def num_free_blocks(self) -> int:
        return min(self.full.num_free_blocks, self.kept.num_free_blocks if self.kept else self.full.num_free_blocks)

    @property
    def prefix_cache_queries_total(self) -> int:
        return self.full.prefix_cache_queries_total

    @property
    def prefix_cache_hits_total(self) -> int:
        return self.full.prefix_cache_hits_total

    def block_table(self, request_id: str) -> list[int]:
        return self.full.block_table(request_id)

    def kept_block_table(self, request_id: str) -> list[int]:
        return (self.kept or self.full).block_table(request_id)

    def request_ids(self) -> set[str]:
        return self.full.request_ids() | (self.kept.request_ids() if self.kept else set())

    # ---- admission and growth -----------------------------------------------------------------

    def match_prefix(self, request_id: str, token_ids: Sequence[int], cache_salt: bytes = b"",
                     plan: PrunePlan | None = None) -> int:
        """Install the cached prefix in both groups' tables; tokens it covers (module docstring)."""
        if plan is not None:
            return self.full.match_prefix(request_id, token_ids, cache_salt, plan.max_match())
        num_hit = self.full.match_prefix(request_id, token_ids, cache_salt)
        if self.kept is None:
            return num_hit
        num_kept_hit = self.kept.match_prefix(request_id, token_ids, cache_salt, num_hit)
        if num_kept_hit < num_hit:  # group B evicted part of it: match A again, only as far
            self.full.free(request_id)
            num_hit = self.full.match_prefix(request_id, token_ids, cache_salt, num_kept_hit)
        return num_hit

    def allocate_slots(self, request_id: str, num_total_tokens: int, token_ids: Sequence[int] | None = None,
                       cache_salt: bytes = b"", plan: PrunePlan | None = None) -> bool:
        """Grow both tables to cover num_total_tokens of group A (and what group B keeps of them);
        False, and no change, if either pool is short."""
        if self.kept is None:
            return self.full.allocate_slots(request_id, num_total_tokens, token_ids, cache_salt)
        num_kept = num_total_tokens if plan is None else plan.num_kept(num_total_tokens)
        if (self.full.num_blocks_needed(request_id, num_total_tokens) > self.full.num_free_blocks
                or self.kept.num_blocks_needed(request_id, num_kept) > self.kept.num_free_blocks):
            return False
        assert self.full.allocate_slots(request_id, num_total_tokens, token_ids, cache_salt)
        kept_token_ids = token_ids if plan is None else None  # None: never registered
        assert self.kept.allocate_slots(request_id, num_kept, kept_token_ids, cache_salt)
        return True

    # ---- release -------------------------------------------------------------------------------

    def free(self, request_id: str) -> None:
        self.full.free(request_id)
        if self.kept is not None:
            self.kept.free(request_id)

    def reset_prefix_cache(self) -> bool:
        reset = self.full.reset_prefix_cache()
        return (self.kept.reset_prefix_cache() if self.kept else False) or reset

    # ---- checks --------------------------------------------------------------------------------

    def check_invariants(self, plans: dict[str, PrunePlan | None] | None = None) -> None:
        """Each group's own invariants; with `plans` (request id -> its plan), also that every
        request's group-B table covers what group B keeps of its group-A tokens."""
        self.full.check_invariants()
        if self.kept is None:
            return
        self.kept.check_invariants()
        for request_id, plan in (plans or {}).items():
            num_blocks_a = len(self.full.block_table(request_id))
            num_blocks_b = len(self.kept.block_table(request_id))
            if plan is None:
                assert num_blocks_b == num_blocks_a, f"{request_id}: {num_blocks_b} B blocks, {num_blocks_a} A"
            else:  # A's table covers between (blocks - 1) * size + 1 and blocks * size tokens
                assert num_blocks_b <= cdiv(plan.num_kept(num_blocks_a * self.block_size), self.block_size), \
                    f"{request_id}: group B holds more blocks than it keeps tokens"
