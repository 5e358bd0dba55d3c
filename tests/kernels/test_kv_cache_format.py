"""The int8 KV cache's rows (engine/kernels/kv_cache_format.py): what quantize_rows writes, what
dequantize_rows reads back, and the error that costs."""

from __future__ import annotations

import pytest
import torch

from engine.kernels.kv_cache_format import (INT8_MAX, SCALE_BYTES, bytes_per_row, dequantize_rows, from_cache_rows,
                                            head_dim_of, quantize_rows, row_size, storage_dtype, to_cache_rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rows_come_back_within_half_a_step_of_their_scale(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    rows = (torch.randn(64, 3, 64) * torch.rand(64, 3, 1) * 20).to(dtype)
    packed = quantize_rows(rows)
    assert packed.dtype == torch.int8 and packed.shape == (64, 3, 64 + SCALE_BYTES)
    scale = packed[..., 64:].contiguous().view(torch.float32)
    torch.testing.assert_close(scale, rows.float().abs().amax(-1, keepdim=True) / INT8_MAX)
    back = dequantize_rows(packed, torch.float32)
    assert (back - rows.float()).abs().le(scale / 2 * (1 + 1e-5)).all()
    # each row's largest value is a whole step: it comes back as +-127 steps
    assert packed[..., :64].abs().amax(-1).eq(INT8_MAX).all()


def test_a_zero_row_stays_zero_and_finite() -> None:
    rows = torch.zeros(2, 16)
    rows[1, 3] = -2.5
    packed = quantize_rows(rows)
    back = dequantize_rows(packed, torch.float32)
    assert torch.equal(back[0], torch.zeros(16))
    assert back[1, 3] == -2.5 and back[1].count_nonzero() == 1


def test_halves_round_to_even() -> None:
    # max 127 makes the scale 1: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, -0.5 -> 0
    rows = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5] + [0.0] * 11])
    assert quantize_rows(rows)[0, :5].tolist() == [127, 0, 2, 2, 0]


def test_format_helpers_agree_on_sizes() -> None:
    assert row_size(64, "auto") == 64 and row_size(64, "int8") == 68
    assert storage_dtype(torch.bfloat16, "auto") == torch.bfloat16 and storage_dtype(torch.bfloat16, "int8") == torch.int8
    assert bytes_per_row(64, torch.bfloat16, "auto") == 128 and bytes_per_row(64, torch.bfloat16, "int8") == 68
    int8_cache = torch.zeros(2, 4, 16, 3, 68, dtype=torch.int8)
    auto_cache = torch.zeros(2, 4, 16, 3, 64, dtype=torch.bfloat16)
    assert head_dim_of(int8_cache) == head_dim_of(auto_cache) == 64
    rows = torch.randn(5, 3, 64).to(torch.bfloat16)
    assert torch.equal(to_cache_rows(rows, auto_cache), rows)
    assert torch.equal(from_cache_rows(to_cache_rows(rows, int8_cache), torch.float32),
                       dequantize_rows(quantize_rows(rows), torch.float32))
