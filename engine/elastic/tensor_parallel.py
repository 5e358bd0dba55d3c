"""Elastic levels under tensor parallelism: which part of every level each rank holds.

The rule (issue #17): **a level's prefix is split evenly across the ranks**, so every rank's share
of a level is a prefix of its own weights and the ranks' work stays balanced at every level.

    FFN neurons   the importance order's 32-neuron blocks are dealt out round-robin: rank r holds
                  blocks r, r + N, r + 2N, ... (N ranks), in importance order.  A level's prefix of
                  b blocks is then ceil((b - r) / N) blocks of rank r: shares differ by at most
                  one block.  (A contiguous cut of the importance order would give rank 0 every
                  neuron of the small levels and rank N-1 none.)
    query heads   ranks hold whole KV groups (engine/model/sharding.py) and a level keeps the r
                  best query heads of every group, so each rank keeps r heads of each of its
                  groups, in its own rank-major slots (engine/elastic/spec.py).
    side paths    the recovery terms add to a block's output, which is a partial sum per rank:
                  rank 0 adds them, and the all-reduce carries them to every rank.

How: the checkpoint's orders are rearranged (`sharded_orders`) so that the permuted weights'
contiguous tensor-parallel cut hands each rank exactly its share, already in its own importance
order; the rank then runs its `local_spec` (its widths) like any elastic model.  K and V heads are
never pruned, so the KV layout per rank is the plain model's.

Refused (ConfigError): fewer KV heads than ranks (a group's query heads are then split across
ranks and a level's heads could leave a rank none), FFN widths not in whole 32-neuron blocks, and
a level whose FFN prefix has fewer blocks than there are ranks.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from engine.config import ConfigError
from engine.elastic.spec import ElasticLevel, ElasticSpec
from engine.kernels.cpu.quantized_weights import BLOCK_SIZE
from engine.model.arch import LlamaArchConfig
from engine.model.sharding import TensorParallelShard


def check_splits(spec: ElasticSpec, size: int) -> None:
    """ConfigError when this checkpoint's levels cannot be split evenly over `size` ranks."""
    if spec.num_kv_heads < size:
        raise ConfigError(f"elastic levels under tensor_parallel_size {size} need at least as many KV heads as "
                          f"ranks (this model has {spec.num_kv_heads}): pass --elastic off")
    if spec.intermediate_size % BLOCK_SIZE or spec.width_multiple % BLOCK_SIZE:
        raise ConfigError(f"elastic levels under tensor parallelism need FFN widths in whole {BLOCK_SIZE}-neuron "
                          "blocks: pass --elastic off")
    narrowest = min(width for level in spec.levels for width in level.ffn_widths)
    if narrowest // BLOCK_SIZE < size:
        raise ConfigError(f"elastic levels keep as few as {narrowest} FFN neurons in a layer: fewer "
                          f"{BLOCK_SIZE}-neuron blocks than tensor_parallel_size {size} ranks; pass --elastic off")


def sharded_orders(ffn_orders: torch.Tensor, head_orders: torch.Tensor, arch: LlamaArchConfig, size: int,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The checkpoint's orders rearranged so that rank r's contiguous cut (TensorParallelShard)
    of the permuted weights is its share, in its own importance order (module docstring)."""
    num_layers, num_blocks = arch.num_layers, arch.intermediate_size // BLOCK_SIZE
    blocks = ffn_orders.reshape(num_layers, num_blocks, BLOCK_SIZE)
    ffn = torch.cat([blocks[:, rank::size] for rank in range(size)], dim=1).reshape(num_layers, -1)
    # head_orders' slot r * G + g holds the r-th best head of group g; a rank holding groups
    # [start, end) takes slots r * G + g for its groups, rank-major over its own groups.
    num_groups, group = arch.num_kv_heads, arch.num_heads // arch.num_kv_heads
    slots = []
    for rank in range(size):
        start, end = TensorParallelShard.for_rank(arch, rank, size).kv_heads
        slots += [r * num_groups + g for r in range(group) for g in range(start, end)]
    return ffn.contiguous(), head_orders[:, slots].contiguous()


def local_spec(spec: ElasticSpec, shard: TensorParallelShard) -> ElasticSpec:
    """The levels as this rank runs them: its share of each FFN prefix (whole blocks), every
    level's head ranks over its own KV groups."""
    rank, size = shard.rank, shard.size

    def local_width(width: int) -> int:  # widths are whole blocks (check_splits)
        return len(range(rank, width // BLOCK_SIZE, size)) * BLOCK_SIZE

    local = shard.local_arch
    levels = tuple(ElasticLevel(level.level, tuple(local_width(w) for w in level.ffn_widths), level.head_ranks)
                   for level in spec.levels)
    return replace(spec, intermediate_size=local.intermediate_size, num_heads=local.num_heads,
                   num_kv_heads=local.num_kv_heads, vocab_size=local.vocab_size, levels=levels,
                   width_multiple=BLOCK_SIZE)
