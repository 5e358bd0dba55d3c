from __future__ import annotations

import pytest
import torch

from engine.kernels.rotary import apply_rotary, apply_rotary_reference
from engine.model.layers.rotary import RotaryEmbedding, apply_rotary as model_apply_rotary


def fused_qkv_views(num_tokens: int, num_q_heads: int, num_kv_heads: int, head_dim: int,
                    dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k as the model makes them: strided views into one fused projection output."""
    q_dim, kv_dim = num_q_heads * head_dim, num_kv_heads * head_dim
    qkv = torch.randn(num_tokens, q_dim + 2 * kv_dim).to(dtype)
    q, k, _ = qkv.split([q_dim, kv_dim, kv_dim], dim=-1)
    return q.view(num_tokens, num_q_heads, head_dim), k.view(num_tokens, num_kv_heads, head_dim)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_q_heads, num_kv_heads, head_dim", [(4, 4, 64), (9, 3, 64), (8, 1, 128)])
def test_matches_model_rotary(dtype: torch.dtype, num_q_heads: int, num_kv_heads: int, head_dim: int) -> None:
    rotary = RotaryEmbedding(head_dim, max_positions=4096, theta=500000.0, scaling=None, freq_factors=None)
    query, key = fused_qkv_views(6, num_q_heads, num_kv_heads, head_dim, dtype)
    positions = torch.tensor([0, 1, 17, 1000, 4095, 3])
    rope = rotary.cos_sin(positions, dtype)
    expected_q, expected_k = model_apply_rotary(query.clone(), *rope), model_apply_rotary(key.clone(), *rope)
    ref_q, ref_k = query.clone(), key.clone()
    apply_rotary_reference(ref_q, ref_k, positions, rotary.cos, rotary.sin)
    apply_rotary(query, key, positions, rotary.cos, rotary.sin)
    for got, ref, model in ((query, ref_q, expected_q), (key, ref_k, expected_k)):
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)
        # The model rotates in the activation dtype (as HF does): in bf16 its products round
        # once more than the kernel's fp32 math, so allow one bf16 ulp there.
        tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1.6e-2)
        torch.testing.assert_close(got, model, **tolerance)


def test_rejects_bad_arguments() -> None:
    query, key = torch.randn(2, 4, 64), torch.randn(2, 2, 64)
    table = torch.randn(16, 32)
    with pytest.raises(ValueError, match="cos must have dtype"):
        apply_rotary(query, key, torch.tensor([0, 1]), table.double(), table)
    with pytest.raises(ValueError, match="head_dim / 2"):
        apply_rotary(query, key, torch.tensor([0, 1]), torch.randn(16, 16), table)
    with pytest.raises(ValueError, match="positions has 3 entries"):
        apply_rotary(query, key, torch.tensor([0, 1, 2]), table, table)
