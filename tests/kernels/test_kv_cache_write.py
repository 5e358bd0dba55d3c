from __future__ import annotations

import pytest
import torch

from engine.kernels.kv_cache_write import kv_cache_write, kv_cache_write_reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_kv_heads, head_dim, block_size", [(1, 64, 16), (3, 128, 16), (8, 64, 5)])
def test_matches_reference_and_skips_padding(dtype: torch.dtype, num_kv_heads: int, head_dim: int,
                                             block_size: int) -> None:
    num_blocks = 6
    cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim).to(dtype)
    expected = cache.clone()
    # Slots at block starts/ends, the cache's last slot, and padding (-1) between them.
    last = num_blocks * block_size - 1
    slot_mapping = torch.tensor([0, block_size - 1, -1, block_size, last, -1, 2 * block_size + 1])
    key = torch.randn(len(slot_mapping), num_kv_heads, head_dim).to(dtype)
    value = torch.randn_like(key)
    kv_cache_write(key, value, cache, slot_mapping)
    kv_cache_write_reference(key, value, expected, slot_mapping)
    assert torch.equal(cache, expected)
    flat = cache.view(2, -1, num_kv_heads, head_dim)
    assert torch.equal(flat[0, last], key[4]) and torch.equal(flat[1, last], value[4])


def test_strided_views_and_fp32_to_bf16_cast() -> None:
    """K/V as views into a fused qkv projection (the model's layout), written into a bf16 cache."""
    num_tokens, num_kv_heads, head_dim = 5, 2, 64
    qkv = torch.randn(num_tokens, (4 + 2 * num_kv_heads) * head_dim)
    _, key, value = qkv.split([4 * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    key = key.view(num_tokens, num_kv_heads, head_dim)
    value = value.view(num_tokens, num_kv_heads, head_dim)
    assert not key.is_contiguous()
    cache = torch.zeros(2, 4, 8, num_kv_heads, head_dim, dtype=torch.bfloat16)
    expected = cache.clone()
    slot_mapping = torch.tensor([7, 8, 9, -1, 31])
    kv_cache_write(key, value, cache, slot_mapping)
    kv_cache_write_reference(key, value, expected, slot_mapping)
    assert torch.equal(cache, expected)


def test_empty_batch_is_a_no_op() -> None:
    cache = torch.zeros(2, 2, 16, 2, 64)
    kv_cache_write(torch.empty(0, 2, 64), torch.empty(0, 2, 64), cache, torch.empty(0, dtype=torch.int64))
    assert not cache.any()


def test_rejects_bad_arguments() -> None:
    cache = torch.zeros(2, 2, 16, 2, 64)
    key = torch.randn(3, 2, 64)
    with pytest.raises(ValueError, match="KV heads"):
        kv_cache_write(torch.randn(3, 4, 64), torch.randn(3, 4, 64), cache, torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="slot_mapping has 2 entries"):
        kv_cache_write(key, key, cache, torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="contiguous in its last dimension"):
        kv_cache_write(key.transpose(1, 2).contiguous().transpose(1, 2), key, cache, torch.zeros(3, dtype=torch.int64))
