"""Tiny factories for paged-attention tests: a random KV cache, block tables, a batch's metadata."""

from __future__ import annotations

import torch

from engine.model.attention_backends.metadata import AttentionMetadata


def random_kv_cache(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                    dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim).to(dtype)


def random_block_tables(seq_lens: list[int], block_size: int, num_blocks: int) -> torch.Tensor:
    """[S, max_blocks] int32: distinct shuffled blocks per sequence (so block order matters),
    padded with 0 like the engine's tables."""
    blocks_needed = [-(-seq_len // block_size) for seq_len in seq_lens]
    max_blocks = max(blocks_needed + [1])
    if sum(blocks_needed) > num_blocks:
        raise ValueError(f"{sum(blocks_needed)} blocks needed, the cache has {num_blocks}")
    pool = torch.randperm(num_blocks).tolist()
    table = torch.zeros(len(seq_lens), max_blocks, dtype=torch.int32)
    for seq, count in enumerate(blocks_needed):
        table[seq, :count] = torch.tensor(pool[:count], dtype=torch.int32)
        pool = pool[count:]
    return table


def slots_for(block_table: torch.Tensor, positions: range, block_size: int) -> list[int]:
    return [int(block_table[pos // block_size]) * block_size + pos % block_size for pos in positions]


def make_metadata(context_lens: list[int], query_lens: list[int], num_decodes: int, block_size: int,
                  block_tables: torch.Tensor) -> tuple[AttentionMetadata, torch.Tensor]:
    """A step's metadata built by hand: sequence s has context_lens[s] cached tokens and schedules
    query_lens[s] new ones (the first num_decodes exactly one). Returns (meta, positions [T])."""
    assert all(q == 1 for q in query_lens[:num_decodes])
    seq_lens = [c + q for c, q in zip(context_lens, query_lens)]
    query_start_loc = [0]
    slot_mapping: list[int] = []
    positions: list[int] = []
    for seq, (context_len, seq_len) in enumerate(zip(context_lens, seq_lens)):
        query_start_loc.append(query_start_loc[-1] + seq_len - context_len)
        slot_mapping += slots_for(block_tables[seq], range(context_len, seq_len), block_size)
        positions += range(context_len, seq_len)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slot_mapping, dtype=torch.int64),
        query_start_loc=torch.tensor(query_start_loc, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=block_tables,
        num_decodes=num_decodes,
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        block_size=block_size,
        query_start_loc_cpu=query_start_loc,
        seq_lens_cpu=seq_lens,
    )
    return meta, torch.tensor(positions, dtype=torch.int64)
