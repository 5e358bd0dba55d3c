"""The KV of a model cut at prune layers l_1 < ... < l_S: one group of layers per stage, each
with its own block pool and block tables (as vLLM's hybrid KV cache manager keeps one table per
group).

    group 0 (`full`)     layers [0, l_1)        every token of every request, and the residual
                                                stream entering l_1
    group s (`stages[s-1]`) layers [l_s, l_{s+1}) every token of an unpruned request; the prompt
                                                tokens stage s kept and the output tokens of a
                                                pruned one (engine/prompt_pruning.py)

Every group indexes the same per-layer KV tensors: block b of group 0 is block b of the layers
below l_1, block b of group s block b of layers [l_s, l_{s+1}); no two overlap, so each pool has
all num_blocks blocks.  Each pool keeps its own invariants (block_pool.py: free + used == total
per pool, ref counts == tables holding the block).  Across the groups, for every request:

    len(group s table) == ceil(num_kept(tokens of group 0, s) / block_size)   (plan None: num_kept(c) == c)

because `allocate_slots` grows every table together, or none (it checks every pool first: a
block registered in the prefix cache is computed in the step being scheduled, so registering one
group's blocks for a step that then does not run would cache KV never written).

Prefix caching.  Group 0 caches and matches as without pruning, for pruned requests too: its
KV depends only on the tokens (and the elastic level's salt), so prefix-cache hits of group 0 do
not depend on who prunes.  The deep groups cache only unpruned requests' blocks, under the same
keys (they hold the full prompt's deep-layer KV); a pruned request's deep blocks hold a subset of
its prompt and are never registered, and a pruned request never matches in a deep group, so no
deep group serves kept tokens as if they were the full prompt.  An unpruned request's hit is the
shortest of the groups' matches (their LRUs evict independently).  A pruned request's group-0
hit stops before its scoring window (PrunePlan.max_match).
"""

from __future__ import annotations

from collections.abc import Sequence

from engine.kv.block_pool import BlockPool
from engine.kv.kv_cache_manager import KVCacheManager, cdiv
from engine.prompt_pruning import PrunePlan


class KVCacheGroups:
    def __init__(self, full: KVCacheManager, stages: Sequence[KVCacheManager] = ()) -> None:
        """`stages`: the deep groups' managers, one per prune layer; none: one group (pruning off)."""
        self.full = full
        self.stages = list(stages)
        self.block_size = full.block_size

    @classmethod
    def create(cls, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
               num_stages: int = 1) -> KVCacheGroups:
        return cls(KVCacheManager(num_blocks, block_size, enable_prefix_caching),
                   [KVCacheManager(num_blocks, block_size, enable_prefix_caching) for _ in range(num_stages)])

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def managers(self) -> list[KVCacheManager]:
        return [self.full, *self.stages]

    @property
    def pool(self) -> BlockPool:
        """Group 0's pool: it holds every token, so it is the one that runs out first."""
        return self.full.pool

    @property
    def usage(self) -> float:
        return max(m.usage for m in self.managers)

    @property
    def num_free_blocks(self) -> int:
        return min(m.num_free_blocks for m in self.managers)

    @property
    def prefix_cache_queries_total(self) -> int:
        return self.full.prefix_cache_queries_total

    @property
    def prefix_cache_hits_total(self) -> int:
        return self.full.prefix_cache_hits_total

    def block_table(self, request_id: str) -> list[int]:
        return self.full.block_table(request_id)

    def kept_block_tables(self, request_id: str) -> list[list[int]]:
        """The deep groups' tables, stage order ([] with one group)."""
        return [m.block_table(request_id) for m in self.stages]

    def request_ids(self) -> set[str]:
        return set().union(*(m.request_ids() for m in self.managers))

    # ---- admission and growth -----------------------------------------------------------------

    def match_prefix(self, request_id: str, token_ids: Sequence[int], cache_salt: bytes = b"",
                     plan: PrunePlan | None = None) -> int:
        """Install the cached prefix in every group's table; tokens it covers (module docstring)."""
        if plan is not None:
            return self.full.match_prefix(request_id, token_ids, cache_salt, plan.max_match())
        num_hit = self.full.match_prefix(request_id, token_ids, cache_salt)
        for index, manager in enumerate(self.stages):
            num_deep_hit = manager.match_prefix(request_id, token_ids, cache_salt, num_hit)
            if num_deep_hit < num_hit:  # this group evicted part of it: match again, only as far
                for shallower in self.managers[:index + 1]:
                    shallower.free(request_id)
                    shallower.match_prefix(request_id, token_ids, cache_salt, num_deep_hit)
                num_hit = num_deep_hit
        return num_hit

    def allocate_slots(self, request_id: str, num_total_tokens: int, token_ids: Sequence[int] | None = None,
                       cache_salt: bytes = b"", plan: PrunePlan | None = None) -> bool:
        """Grow every table to cover num_total_tokens of group 0 (and what each deep group keeps
        of them); False, and no change, if any pool is short."""
        needs = [num_total_tokens if plan is None else plan.num_kept(num_total_tokens, s)
                 for s in range(self.num_stages)]
        if self.full.num_blocks_needed(request_id, num_total_tokens) > self.full.num_free_blocks or any(
                m.num_blocks_needed(request_id, n) > m.num_free_blocks for m, n in zip(self.stages, needs)):
            return False
        assert self.full.allocate_slots(request_id, num_total_tokens, token_ids, cache_salt)
        kept_token_ids = token_ids if plan is None else None  # None: never registered
        for manager, num_kept in zip(self.stages, needs):
            assert manager.allocate_slots(request_id, num_kept, kept_token_ids, cache_salt)
        return True

    # ---- release -------------------------------------------------------------------------------

    def free(self, request_id: str) -> None:
        for manager in self.managers:
            manager.free(request_id)

    def reset_prefix_cache(self) -> bool:
        return any([m.reset_prefix_cache() for m in self.managers])  # a list: every group resets

    # ---- checks --------------------------------------------------------------------------------

    def check_invariants(self, plans: dict[str, PrunePlan | None] | None = None) -> None:
        """Each group's own invariants; with `plans` (request id -> its plan), also that every
        request's deep tables cover what each deep group keeps of its group-0 tokens."""
        for manager in self.managers:
            manager.check_invariants()
        for request_id, plan in (plans or {}).items():
            num_blocks_full = len(self.full.block_table(request_id))
            for stage, manager in enumerate(self.stages):
                num_blocks = len(manager.block_table(request_id))
                if plan is None:
                    assert num_blocks == num_blocks_full, \
                        f"{request_id}: {num_blocks} blocks in group {stage + 1}, {num_blocks_full} in group 0"
                else:  # group 0's table covers between (blocks - 1) * size + 1 and blocks * size tokens
                    most = cdiv(plan.num_kept(num_blocks_full * self.block_size, stage), self.block_size)
                    assert num_blocks <= most, f"{request_id}: group {stage + 1} holds more blocks than it keeps tokens"
