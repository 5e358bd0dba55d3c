from __future__ import annotations

import pytest
import torch

from engine.kernels.rms_norm import rms_norm, rms_norm_reference
from engine.model.compute_plan import ComputePlan
from engine.model.layers.norm import RMSNorm

EPS = 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_rows, hidden_size", [(1, 64), (7, 576), (3, 100)])
def test_plain_matches_reference_and_model(dtype: torch.dtype, num_rows: int, hidden_size: int) -> None:
    x = (torch.randn(num_rows, hidden_size) * 3).to(dtype)
    weight = torch.randn(hidden_size).to(dtype)
    out = rms_norm(x, weight, EPS)
    torch.testing.assert_close(out, rms_norm_reference(x, weight, EPS), atol=1e-6, rtol=1e-5)
    model_norm = RMSNorm(hidden_size, EPS, ComputePlan.reference()).to(dtype)
    model_norm.weight.data.copy_(weight)
    torch.testing.assert_close(out, model_norm(x), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_residual_add(dtype: torch.dtype) -> None:
    x = torch.randn(5, 576).to(dtype)
    residual = torch.randn(5, 576).to(dtype)
    weight = torch.randn(576).to(dtype)
    out, residual_out = rms_norm(x, weight, EPS, residual=residual)
    expected_out, expected_residual = rms_norm_reference(x, weight, EPS, residual=residual)
    assert torch.equal(residual_out, expected_residual)
    torch.testing.assert_close(out, expected_out, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(residual_out, x + residual)


def test_strided_rows_and_zero_rows() -> None:
    wide = torch.randn(4, 256)
    x = wide[:, :128]  # row stride 256
    weight = torch.randn(128)
    torch.testing.assert_close(rms_norm(x, weight, EPS), rms_norm_reference(x, weight, EPS), atol=1e-6, rtol=1e-5)
    assert rms_norm(torch.empty(0, 128), weight, EPS).shape == (0, 128)


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="weight must be"):
        rms_norm(torch.randn(2, 64), torch.randn(64, dtype=torch.bfloat16), EPS)
    with pytest.raises(ValueError, match="residual must match"):
        rms_norm(torch.randn(2, 64), torch.randn(64), EPS, residual=torch.randn(3, 64))
