from __future__ import annotations

import pytest
import torch

from engine.kernels.paged_prefill_attention import paged_prefill_attention, paged_prefill_attention_reference

from engine.kernels.kv_cache_format import quantize_rows

from .paged_batch import random_block_tables, random_kv_cache

TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def run_case(context_lens: list[int], query_lens: list[int], num_q_heads: int, num_kv_heads: int,
             head_dim: int, dtype: torch.dtype, block_size: int = 16, int8_cache: bool = False) -> None:
    seq_lens = [c + q for c, q in zip(context_lens, query_lens)]
    num_blocks = sum(-(-n // block_size) for n in seq_lens) + 2
    cache = random_kv_cache(num_blocks, block_size, num_kv_heads, head_dim, dtype)
    if int8_cache:
        cache = quantize_rows(cache)
    block_tables = random_block_tables(seq_lens, block_size, num_blocks)
    query_start_loc = torch.tensor([0] + torch.tensor(query_lens).cumsum(0).tolist(), dtype=torch.int32)
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32)
    query = torch.randn(sum(query_lens), num_q_heads, head_dim).to(dtype)
    args = (query, cache, block_tables, seq_lens_t, query_start_loc, max(query_lens))
    out = paged_prefill_attention(*args)
    torch.testing.assert_close(out.float(), paged_prefill_attention_reference(*args).float(), **TOLERANCE[dtype])


# (context_lens, query_lens): fresh prefills (no context), chunks whose context ends at or across
# a block boundary, an empty chunk, single-token chunks, and chunks longer than one 64-row tile.
CHUNKS = {
    "fresh": ([0, 0, 0], [1, 16, 17]),
    "boundaries": ([16, 15, 17, 32], [16, 2, 15, 1]),
    "empty_and_single": ([5, 40, 0], [0, 1, 1]),
}
GQA_SHAPES = [(2, 2, 64), (6, 2, 128), (8, 1, 64)]  # ratios 1, 3, 8


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunks", CHUNKS.values(), ids=CHUNKS.keys())
@pytest.mark.parametrize("num_q_heads, num_kv_heads, head_dim", GQA_SHAPES)
def test_matches_reference(dtype: torch.dtype, chunks: tuple[list[int], list[int]], num_q_heads: int,
                           num_kv_heads: int, head_dim: int) -> None:
    run_case(*chunks, num_q_heads, num_kv_heads, head_dim, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunks", CHUNKS.values(), ids=CHUNKS.keys())
def test_int8_cache_matches_reference(dtype: torch.dtype, chunks: tuple[list[int], list[int]]) -> None:
    """Rows of head_dim int8 values and their scale (kv_cache_format.py), dequantized per tile."""
    run_case(*chunks, 6, 2, 64, dtype, int8_cache=True)


@pytest.mark.parametrize("num_q_heads, num_kv_heads, head_dim", GQA_SHAPES)
def test_chunks_longer_than_one_tile(num_q_heads: int, num_kv_heads: int, head_dim: int) -> None:
    run_case([3, 0], [70, 129], num_q_heads, num_kv_heads, head_dim, torch.float32)


@pytest.mark.parametrize("block_size", [1, 5])
def test_block_sizes_not_matching_the_tile(block_size: int) -> None:
    run_case([9, 20], [7, 3], 4, 2, 64, torch.float32, block_size)


def test_short_chunk_over_2048_context() -> None:
    run_case([2044, 0], [4, 3], 3, 1, 64, torch.bfloat16)


def test_rows_of_other_sequences_are_untouched() -> None:
    """The backend hands the whole batch's query and output with only the prefill sequences'
    query_start_loc; the decode rows before them must stay as they are."""
    cache = random_kv_cache(6, 16, 2, 64, torch.float32)
    block_tables = random_block_tables([10, 30], 16, 6)
    query = torch.randn(8, 4, 64)
    output = torch.full_like(query, 7.0)
    query_start_loc = torch.tensor([3, 5, 8], dtype=torch.int32)  # rows 0..2 belong to decodes
    seq_lens = torch.tensor([10, 30], dtype=torch.int32)
    args = (query, cache, block_tables, seq_lens, query_start_loc, 3)
    paged_prefill_attention(*args, out=output)
    expected = paged_prefill_attention_reference(*args)
    torch.testing.assert_close(output[3:], expected[3:], **TOLERANCE[torch.float32])
    assert (output[:3] == 7.0).all()


def test_rejects_bad_arguments() -> None:
    cache = random_kv_cache(4, 16, 2, 64, torch.float32)
    block_tables = torch.zeros(1, 4, dtype=torch.int32)
    seq_lens = torch.tensor([10], dtype=torch.int32)
    with pytest.raises(ValueError, match="query_start_loc of 2 entries"):
        paged_prefill_attention(torch.randn(3, 4, 64), cache, block_tables, seq_lens,
                                torch.tensor([0], dtype=torch.int32), 3)
    with pytest.raises(ValueError, match="query_start_loc must have dtype"):
        paged_prefill_attention(torch.randn(3, 4, 64), cache, block_tables, seq_lens,
                                torch.tensor([0, 3]), 3)
