"""The C++ side path of an elastic level (decode_layer.cpp, side_path_rows: out += B (A x) + bias,
the distilled LoRA and the closed-form bias of engine/elastic/recovery.py) against the torch
expression, for every build of the kernels this CPU runs (avx512_bf16, avx512, avx2; the others
skip).

The kernel takes A's rows and the batch's rows a few at a time; a row's arithmetic must not depend
on how many rows share the call or where a block of them ends (the fused layer and the
layer-by-layer tile path split a step's rows differently, and must give the same bits).
"""

from __future__ import annotations

import ctypes

import pytest
import torch

from engine.kernels.cpu import decode_layer

DTYPES = [torch.float32, torch.bfloat16]


def side_path(library: ctypes.CDLL, lora_a: torch.Tensor | None, lora_b_rows: torch.Tensor | None,
              bias: torch.Tensor | None, x: torch.Tensor, out: torch.Tensor) -> None:
    """out += lora_b (lora_a x) + bias in place, through `library`'s build of the kernel."""
    assert decode_layer.elastic_side_path(lora_a, lora_b_rows, bias, x, out, library=library)


def operands(rank: int, hidden: int, rows: int, dtype: torch.dtype, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    lora_a = torch.randn(rank, hidden, generator=generator) / hidden ** 0.5
    lora_b_rows = torch.randn(rank, hidden, generator=generator)
    bias = torch.randn(hidden, generator=generator).to(dtype)
    x = torch.randn(rows, hidden, generator=generator).to(dtype)
    out = torch.randn(rows, hidden, generator=generator).to(dtype)
    return lora_a, lora_b_rows, bias, x, out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rank, hidden, rows", [(8, 576, 16), (8, 576, 7), (3, 576, 5), (11, 100, 9), (1, 33, 1)])
def test_side_path_matches_the_torch_expression(library: ctypes.CDLL, dtype: torch.dtype, rank: int, hidden: int,
                                                rows: int) -> None:
    """Ranks and rows that are not whole blocks of the kernel's (11: 8 + 3; 7 rows: 4 + 3) and
    hidden sizes with a lane tail (100, 33)."""
    lora_a, lora_b_rows, bias, x, out = operands(rank, hidden, rows, dtype)
    # SidePath.add_to's two in-place adds, each rounded to out's dtype once
    expected = (out.float() + (x.float() @ lora_a.T) @ lora_b_rows).to(dtype)
    expected = (expected.float() + bias.float()).to(dtype)
    side_path(library, lora_a, lora_b_rows, bias, x, out)
    if dtype == torch.float32:
        torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-5)
    else:  # fp32 sums in another order than torch's: a rounding boundary may fall either way
        step = torch.finfo(torch.bfloat16).eps * expected.float().abs().clamp_min(1e-3)
        assert ((out.float() - expected.float()).abs() <= 2.01 * step).all()
        assert (out == expected).float().mean().item() >= 0.95


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_rows_bits_do_not_depend_on_the_rows_beside_it(library: ctypes.CDLL, dtype: torch.dtype) -> None:
    """Every row of calls of 1 to 9 rows equals the same row computed alone, bit for bit."""
    rank, hidden = 8, 576
    lora_a, lora_b_rows, bias, x, out = operands(rank, hidden, 9, dtype, seed=1)
    alone = out.clone()
    for r in range(9):
        side_path(library, lora_a, lora_b_rows, bias, x[r:r + 1], alone[r:r + 1])
    for rows in range(1, 10):
        together = out[:rows].clone()
        side_path(library, lora_a, lora_b_rows, bias, x[:rows], together)
        assert torch.equal(together, alone[:rows]), f"{rows} rows in one call"


def test_bias_alone_and_lora_alone(library: ctypes.CDLL) -> None:
    """A level with only a closed-form bias, or only an adapter (no bias), adds just that."""
    lora_a, lora_b_rows, bias, x, out = operands(4, 64, 6, torch.float32, seed=2)
    only_bias = out.clone()
    side_path(library, None, None, bias, x, only_bias)
    assert torch.equal(only_bias, out + bias)
    only_lora = out.clone()
    side_path(library, lora_a, lora_b_rows, None, x, only_lora)
    torch.testing.assert_close(only_lora, out + (x @ lora_a.T) @ lora_b_rows, atol=1e-5, rtol=1e-5)
