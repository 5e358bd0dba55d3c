from __future__ import annotations

import pytest
import torch

from engine.kernels.paged_decode_attention import paged_decode_attention, paged_decode_attention_reference

from engine.kernels.kv_cache_format import quantize_rows

from .paged_batch import random_block_tables, random_kv_cache

TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def run_case(seq_lens: list[int], num_q_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
             dtype: torch.dtype, partition_size: int, int8_cache: bool = False) -> None:
    num_blocks = sum(-(-n // block_size) for n in seq_lens) + 3
    cache = random_kv_cache(num_blocks, block_size, num_kv_heads, head_dim, dtype)
    if int8_cache:
        cache = quantize_rows(cache)
    block_tables = random_block_tables(seq_lens, block_size, num_blocks)
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32)
    query = torch.randn(len(seq_lens), num_q_heads, head_dim).to(dtype)
    out = paged_decode_attention(query, cache, block_tables, seq_lens_t, max(seq_lens), partition_size=partition_size)
    expected = paged_decode_attention_reference(query, cache, block_tables, seq_lens_t, max(seq_lens))
    torch.testing.assert_close(out.float(), expected.float(), **TOLERANCE[dtype])


# GQA ratio = num_q_heads / num_kv_heads: 1, 3 and 8. Lengths sit at, just past and just short of
# block (16) and split boundaries; small partitions force many splits and ragged last splits.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_q_heads, num_kv_heads, head_dim, seq_lens, partition_size", [
    (4, 4, 64, [1, 15, 16, 17], 512),
    (6, 2, 64, [1, 31, 32, 33, 100], 32),
    (8, 1, 128, [16, 48, 64, 65], 16),
    (24, 3, 64, [7, 129], 64),
    (9, 3, 64, [300, 2, 5], 128),
])
def test_matches_reference(dtype: torch.dtype, num_q_heads: int, num_kv_heads: int, head_dim: int,
                           seq_lens: list[int], partition_size: int) -> None:
    run_case(seq_lens, num_q_heads, num_kv_heads, head_dim, 16, dtype, partition_size)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_q_heads, num_kv_heads, head_dim, seq_lens, partition_size", [
    (6, 2, 64, [1, 31, 32, 33, 100], 32),
    (8, 1, 128, [16, 48, 64, 65], 16),
    (9, 3, 64, [300, 2, 5], 128),
])
def test_int8_cache_matches_reference(dtype: torch.dtype, num_q_heads: int, num_kv_heads: int, head_dim: int,
                                      seq_lens: list[int], partition_size: int) -> None:
    """Rows of head_dim int8 values and their scale (kv_cache_format.py), dequantized per tile."""
    run_case(seq_lens, num_q_heads, num_kv_heads, head_dim, 16, dtype, partition_size, int8_cache=True)


@pytest.mark.parametrize("block_size", [1, 5, 32])
def test_block_sizes_not_matching_the_tile(block_size: int) -> None:
    run_case([1, 33, 70], 4, 2, 64, block_size, torch.float32, 32)


@pytest.mark.parametrize("dtype, head_dim", [(torch.float32, 64), (torch.bfloat16, 128)])
def test_long_context_2048(dtype: torch.dtype, head_dim: int) -> None:
    run_case([2048, 1000], 8, 1, head_dim, 16, dtype, 512)


def test_writes_into_a_strided_out_view() -> None:
    """The backend passes output[:num_decodes] of a larger tensor; rows past it stay untouched."""
    cache = random_kv_cache(8, 16, 2, 64, torch.float32)
    block_tables = random_block_tables([20, 40], 16, 8)
    seq_lens = torch.tensor([20, 40], dtype=torch.int32)
    query = torch.randn(2, 4, 64)
    output = torch.full((5, 4, 64), 7.0)
    paged_decode_attention(query, cache, block_tables, seq_lens, 40, out=output[:2])
    expected = paged_decode_attention_reference(query, cache, block_tables, seq_lens, 40)
    torch.testing.assert_close(output[:2], expected, **TOLERANCE[torch.float32])
    assert (output[2:] == 7.0).all()


def test_rejects_bad_arguments() -> None:
    cache = random_kv_cache(4, 16, 2, 64, torch.float32)
    block_tables = torch.zeros(1, 4, dtype=torch.int32)
    seq_lens = torch.tensor([10], dtype=torch.int32)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        paged_decode_attention(torch.randn(1, 3, 64), cache, block_tables, seq_lens, 10)
    with pytest.raises(ValueError, match="head_dim"):
        paged_decode_attention(torch.randn(1, 4, 128), cache, block_tables, seq_lens, 10)
    with pytest.raises(ValueError, match="block_tables must have dtype"):
        paged_decode_attention(torch.randn(1, 4, 64), cache, block_tables.long(), seq_lens, 10)
    with pytest.raises(ValueError, match="capacity"):
        paged_decode_attention(torch.randn(1, 4, 64), cache, block_tables, seq_lens, 65)
    with pytest.raises(ValueError, match="partition_size"):
        paged_decode_attention(torch.randn(1, 4, 64), cache, block_tables, seq_lens, 10, partition_size=48)
