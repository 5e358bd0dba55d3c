from __future__ import annotations

import pytest
import torch

from engine.kernels.kv_cache_format import quantize_rows
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_kv_heads, head_dim", [(3, 64), (2, 80)])  # 80: a tile wider than the row
def test_int8_cache_gets_the_bytes_torch_quantizes(dtype: torch.dtype, num_kv_heads: int, head_dim: int) -> None:
    """Each (token, KV head) row quantized in the kernel: values and scale byte for byte as
    kv_cache_format.quantize_rows writes them (halves to even included), padding skipped."""
    cache = quantize_rows(torch.randn(2, 4, 16, num_kv_heads, head_dim))
    expected = cache.clone()
    slot_mapping = torch.tensor([0, 15, -1, 16, 63, 33])
    key = (torch.randn(len(slot_mapping), num_kv_heads, head_dim) * 4).to(dtype)
    key[0, 0, :3] = torch.tensor([127.0, 0.5, 2.5])  # scale 1: 0.5 -> 0, 2.5 -> 2
    key[0, 0, 3:] = 0
    value = torch.randn_like(key)
    value[1, 1] = 0  # a zero row keeps scale 0
    kv_cache_write(key, value, cache, slot_mapping)
    kv_cache_write_reference(key, value, expected, slot_mapping)
    assert torch.equal(cache, expected)
    assert cache[0, 0, 0, 0, :3].tolist() == [127, 0, 2]


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
