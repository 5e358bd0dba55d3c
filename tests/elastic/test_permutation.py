"""Permuting the weights keeps the model: at level 100 the permuted model's logits equal the
original's; quantized rows move byte for byte where the permutation is exact."""

from __future__ import annotations

import pytest
import torch

from engine.elastic.importance import ffn_orders, head_orders, random_importance
from engine.elastic.permutation import permute_column_groups, permute_rows, permute_weights
from engine.elastic.torch_model import TorchLlama
from engine.kernels.cpu import native_library
from engine.kernels.cpu.quantized_weights import InputPermutedBlocks, QuantFormat, dequantize, quantize
from engine.model.compute_plan import ComputePlan
from engine.model.layers.linear import Linear


def random_orders(config, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    importance = random_importance(config.num_layers, config.intermediate_size, config.num_heads, seed)
    return ffn_orders(importance), head_orders(importance, config.num_kv_heads)


def test_permuted_model_equals_the_original_at_level_100(torch_llama) -> None:
    config = torch_llama.config
    ffn, heads = random_orders(config)
    permuted = TorchLlama(config, dict(permute_weights(torch_llama.weights.items(), config, ffn, heads)),
                          rank_major_heads=True)
    ids = torch.tensor([[1, 504, 3250, 28, 260, 1345, 314, 9220, 30, 2]])
    with torch.no_grad():
        assert (permuted(ids) - torch_llama(ids)).abs().max().item() <= 1e-4


def test_quantized_rows_and_head_columns_move_byte_for_byte() -> None:
    weight = quantize(torch.randn(8, 128), QuantFormat.Q8_0)
    rows = torch.tensor([3, 1, 0, 2, 7, 6, 5, 4])
    moved = permute_rows(weight, rows)
    assert torch.equal(moved.blocks, weight.blocks[rows])
    heads = torch.tensor([1, 0])  # two 64-column heads = 2 blocks each
    moved = permute_column_groups(weight, heads, 64)
    assert moved.format == weight.format
    assert torch.equal(dequantize(moved), torch.cat([dequantize(weight)[:, 64:], dequantize(weight)[:, :64]], 1))
    block_bytes = weight.format.block_bytes
    assert torch.equal(moved.blocks[:, :2 * block_bytes], weight.blocks[:, 2 * block_bytes:])


def test_quantized_down_proj_keeps_its_blocks_beside_the_permutation() -> None:
    weight = quantize(torch.randn(16, 64), QuantFormat.Q4_1)
    neurons = torch.randperm(64)
    moved = permute_column_groups(weight, neurons, 1)
    assert isinstance(moved, InputPermutedBlocks) and moved.blocks is weight  # the file's bytes, not a copy
    assert torch.equal(moved.dequantize(), dequantize(weight)[:, neurons])


@pytest.mark.skipif(native_library.load() is None, reason="no C++ compiler or no AVX2 here: no quantized linear")
@pytest.mark.parametrize("dense_above_rows", [None, 2])
def test_linear_with_permuted_inputs_computes_the_permuted_weight(dense_above_rows: int | None) -> None:
    """The layer gathers its inputs into the blocks' stored order: whole, a row range and a
    column tile all compute what the permuted dense weight does; past dense_above_rows the dense
    copy is the permuted weight."""
    weight = quantize(torch.randn(48, 96), QuantFormat.Q4_1)
    moved = permute_column_groups(weight, torch.randperm(96), 1)
    plan = ComputePlan(device=torch.device("cpu"), dtype=torch.float32, weight_format="native", native_ops=True,
                       prepack_bf16=False, dense_above_rows=dense_above_rows)
    linear = Linear(96, 48, False, plan)
    linear.load(moved)
    assert linear.quantized.blocks is weight.blocks
    dense = moved.dequantize()
    for rows in (1, 2, 5):
        x = torch.randn(rows, 96)
        torch.testing.assert_close(linear(x), x @ dense.T, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(linear.forward_rows(x, 8, 40), x @ dense[8:40].T, atol=1e-4, rtol=1e-4)
        if linear.reads_whole_columns(rows):
            torch.testing.assert_close(linear.forward_columns(x[:, 32:64], 32, 64), x[:, 32:64] @ dense[:, 32:64].T,
                                       atol=1e-4, rtol=1e-4)
    assert linear.reads_whole_columns(2) and linear.reads_whole_columns(5) == (dense_above_rows is None)
