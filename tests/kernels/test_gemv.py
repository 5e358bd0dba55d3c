from __future__ import annotations

import pytest
import torch

from engine.kernels.gemv import gemv, gemv_reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_rows, n, k, split_k", [(1, 576, 576, 1), (5, 130, 300, 3), (16, 64, 1536, 4)])
def test_dense_matches_reference(dtype: torch.dtype, num_rows: int, n: int, k: int, split_k: int) -> None:
    x = torch.randn(num_rows, k).to(dtype)
    weight = (torch.randn(n, k) / k ** 0.5).to(dtype)
    out = gemv(x, weight, split_k=split_k)
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(out, gemv_reference(x, weight), **tolerance)


def int8_weight(n: int, k: int, case: str) -> tuple[torch.Tensor, torch.Tensor]:
    weight = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    scale = torch.rand(n) / 127
    if case == "zero_scale":
        scale[::3] = 0.0
    elif case == "negative":
        weight = -weight.abs().clamp(max=127)
        scale[1::2] *= -1  # a negative scale flips the channel
    elif case == "max_magnitude":
        weight[: n // 2] = -128
        weight[n // 2:] = 127
    return weight, scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["random", "zero_scale", "negative", "max_magnitude"])
def test_int8_weight_only(dtype: torch.dtype, case: str) -> None:
    x = torch.randn(3, 256).to(dtype)
    weight, scale = int8_weight(96, 256, case)
    out = gemv(x, weight, scale.to(dtype), split_k=2)
    expected = gemv_reference(x, weight, scale.to(dtype))
    tolerance = dict(atol=1e-4, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(out, expected, **tolerance)
    if case == "zero_scale":
        assert (out[:, ::3] == 0).all()


def test_rejects_bad_arguments() -> None:
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match="at most 16 rows"):
        gemv(torch.randn(17, 64), torch.randn(8, 64))
    with pytest.raises(ValueError, match="needs per-output-channel scale"):
        gemv(x, torch.zeros(8, 64, dtype=torch.int8))
    with pytest.raises(ValueError, match="must be x's"):
        gemv(x, torch.randn(8, 64, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="features"):
        gemv(x, torch.randn(8, 32))
