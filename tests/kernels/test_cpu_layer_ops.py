"""The C++ per-layer ops (RMSNorm with the fused residual add, RoPE, SiLU-and-mul) against the
torch expressions of engine/model/llama.py that they stand in for, and a tiny Llama run both ways,
for every build of the kernels this CPU runs (avx512_bf16, avx512, avx2; the others skip).

RoPE and the residual add round exactly where torch does, so they must match bit for bit. The
norm's sum of squares and SiLU's exp are fp32 computations in another order or formula than
torch's: in fp32 they agree to ~1e-6, in bf16 a rare element may differ in the last place.
"""

from __future__ import annotations

import ctypes

import pytest
import torch
import torch.nn.functional as F

from engine.capabilities import cpu_features
from engine.kernels.cpu import layer_ops, native_library
from engine.model.arch import LlamaArchConfig
from engine.model.compute_plan import ComputePlan
from engine.model.layers.norm import RMSNorm
from engine.model.layers.rotary import RotaryEmbedding, apply_rotary
from tests.tiny_llama import forward, tiny_llama
from engine.model.attention_backends.torch_backend import TorchAttentionBackend

from .paged_batch import make_metadata, random_block_tables

REFERENCE = ComputePlan.reference()  # the torch expressions the kernels stand in for
DTYPES = [torch.float32, torch.bfloat16]


def assert_nearly_bit_equal(got: torch.Tensor, expected: torch.Tensor, max_ulps: float = 1.0) -> None:
    """bf16: at least 99% bit-equal, the rest at most max_ulps bf16 steps apart; fp32: close."""
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        return
    exact = (got == expected).float().mean().item()
    assert exact >= 0.99, f"only {exact:.4f} of elements match exactly"
    ulp = torch.finfo(torch.bfloat16).eps * expected.float().abs().clamp_min(torch.finfo(torch.float32).tiny)
    assert ((got.float() - expected.float()).abs() <= ulp * max_ulps * 1.01).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, hidden", [(1, 576), (32, 576), (7, 100), (130, 2048)])  # 100: a row tail
def test_rms_norm_matches_torch_path(library: ctypes.CDLL, dtype: torch.dtype, rows: int, hidden: int) -> None:
    norm = RMSNorm(hidden, 1e-5, REFERENCE).to(dtype)
    norm.weight.data.normal_()
    x = (torch.randn(rows, hidden) * 3).to(dtype)
    assert_nearly_bit_equal(layer_ops.rms_norm(x, norm.weight, norm.eps, library=library), norm._normalize(x))


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_residual_add(library: ctypes.CDLL, dtype: torch.dtype) -> None:
    norm = RMSNorm(576, 1e-5, REFERENCE).to(dtype)
    norm.weight.data.normal_()
    x, residual = torch.randn(9, 576).to(dtype), torch.randn(9, 576).to(dtype)
    expected_residual = x + residual
    out = layer_ops.rms_norm(x, norm.weight, norm.eps, residual, library=library)
    assert torch.equal(residual, expected_residual)  # updated in place, rounded as torch rounds
    assert_nearly_bit_equal(out, norm._normalize(expected_residual))


def test_rms_norm_strided_rows(library: ctypes.CDLL) -> None:
    wide = torch.randn(4, 256).to(torch.bfloat16)
    weight = torch.randn(128).to(torch.bfloat16)
    norm = RMSNorm(128, 1e-5, REFERENCE).to(torch.bfloat16)
    norm.weight.data.copy_(weight)
    assert_nearly_bit_equal(layer_ops.rms_norm(wide[:, :128], weight, 1e-5, library=library),
                            norm._normalize(wide[:, :128]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_q_heads, num_kv_heads, head_dim", [(9, 3, 64), (4, 2, 128), (2, 1, 80)])
def test_rotary_is_bit_exact(library: ctypes.CDLL, dtype: torch.dtype, num_q_heads: int, num_kv_heads: int,
                             head_dim: int) -> None:
    """In place on the Q and K heads of a fused QKV output (rows strided by the V heads)."""
    rotary = RotaryEmbedding(head_dim, 4096, 10000.0, None, None)
    positions = torch.tensor([0, 1, 17, 1000, 4095, 3])
    tables = rotary.tables(positions, dtype)
    heads = num_q_heads + num_kv_heads
    qkv = torch.randn(len(positions), (heads + num_kv_heads) * head_dim).to(dtype)
    query_and_key = qkv[:, : heads * head_dim].view(len(positions), heads, head_dim)
    expected = apply_rotary(query_and_key.clone(), *tables.full())
    values_before = qkv[:, heads * head_dim:].clone()
    layer_ops.rotary_embedding_(query_and_key, tables.cos, tables.sin, library=library)
    assert torch.equal(query_and_key, expected)
    assert torch.equal(qkv[:, heads * head_dim:], values_before)  # V heads untouched


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens, width", [(1, 3072), (32, 3072), (5, 200)])
def test_silu_and_mul_matches_torch_path(library: ctypes.CDLL, dtype: torch.dtype, tokens: int, width: int) -> None:
    x = (torch.randn(tokens, width) * 4).to(dtype)
    x[0, :8] = torch.tensor([-100.0, -20.0, -1e-3, 0.0, 1e-3, 20.0, 100.0, -0.5])  # far tails, zero
    gate, up = x.chunk(2, dim=-1)
    # silu(g) may round the other way at a tie (one step), which the product with up can carry to two
    assert_nearly_bit_equal(layer_ops.silu_and_mul(x, library=library), F.silu(gate) * up, max_ulps=2.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_reads_and_writes_strided_rows(library: ctypes.CDLL, dtype: torch.dtype) -> None:
    """An elastic level's slice: gate and up of width n, then side-path columns the kernel must
    neither read nor overwrite, into a wider output row."""
    n, extra = 40, 8
    x = (torch.randn(6, 2 * n + extra) * 4).to(dtype)
    out = torch.full((6, n + extra), 7.0, dtype=dtype)
    layer_ops.silu_and_mul(x, n, out[:, :n], library=library)
    assert_nearly_bit_equal(out[:, :n], F.silu(x[:, :n]) * x[:, n:2 * n], max_ulps=2.0)
    assert torch.equal(out[:, n:], torch.full((6, extra), 7.0, dtype=dtype))


def test_builds_agree_bit_for_bit(library: ctypes.CDLL) -> None:
    """Every build sums in the same order (kSumLanes in simd.h): the norm gives the best build's bits."""
    best = native_library.load(cpu_features().kernel_isa)
    x, weight = torch.randn(33, 2056) * 3, torch.randn(2056)  # 2056: a row tail in both builds
    for dtype in DTYPES:
        args = (x.to(dtype), weight.to(dtype), 1e-5)
        assert torch.equal(layer_ops.rms_norm(*args, library=library), layer_ops.rms_norm(*args, library=best))


def test_rejects_bad_arguments(library: ctypes.CDLL) -> None:
    x = torch.randn(4, 64)
    with pytest.raises(ValueError, match="weight"):
        layer_ops.rms_norm(x, torch.randn(32), 1e-5, library=library)
    with pytest.raises(ValueError, match="float64"):
        layer_ops.rms_norm(x, torch.randn(64, dtype=torch.float64), 1e-5, library=library)
    with pytest.raises(ValueError, match="even"):
        layer_ops.rotary_embedding_(torch.randn(2, 3, 7), torch.randn(2, 3), torch.randn(2, 3), library=library)
    with pytest.raises(ValueError, match="cos"):
        layer_ops.rotary_embedding_(torch.randn(2, 3, 8), torch.randn(2, 3), torch.randn(2, 4), library=library)
    with pytest.raises(ValueError, match="2n"):
        layer_ops.silu_and_mul(torch.randn(2, 7), library=library)


@pytest.mark.parametrize("dtype", DTYPES)
def test_tiny_llama_same_logits_both_ways(library: ctypes.CDLL, dtype: torch.dtype,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole forward (prefill chunks and decodes) with the native ops and with the torch path."""
    monkeypatch.setattr(native_library, "load", lambda isa=None: library)  # the model's layers use this build
    config = LlamaArchConfig(vocab_size=256, hidden_size=128, intermediate_size=320, num_layers=2,
                             num_heads=4, num_kv_heads=2, head_dim=32, max_position_embeddings=256)
    native_plan = ComputePlan(device=torch.device("cpu"), dtype=dtype, weight_format="dequantized",
                              native_ops=True, prepack_bf16=False)
    models = {plan.native_ops: tiny_llama(config, TorchAttentionBackend(), plan)
              for plan in (native_plan, ComputePlan.reference(dtype))}
    context_lens, query_lens = [0, 0, 20, 33], [5, 12, 1, 1]
    order = [2, 3, 0, 1]  # decodes first, as the runner lays a batch out
    context_lens, query_lens = [context_lens[i] for i in order], [query_lens[i] for i in order]
    seq_lens = [c + q for c, q in zip(context_lens, query_lens)]
    block_tables = random_block_tables(seq_lens, 16, 16)
    input_ids = torch.randint(0, config.vocab_size, (sum(query_lens),))

    def logits(native: bool) -> torch.Tensor:
        meta, positions = make_metadata(context_lens, query_lens, 2, 16, block_tables)
        caches = [torch.zeros(2, 16, 16, 2, 32, dtype=dtype) for _ in range(config.num_layers)]
        with torch.inference_mode():
            return models[native].compute_logits(forward(models[native], input_ids, positions, caches, meta))

    tolerance = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=6e-2, rtol=6e-2)
    torch.testing.assert_close(logits(True), logits(False), **tolerance)
