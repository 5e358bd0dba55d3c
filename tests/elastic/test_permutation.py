"""Permuting the weights keeps the model: at level 100 the permuted model's logits equal the
original's; quantized rows move byte for byte where the permutation is exact."""

from __future__ import annotations

import torch

from engine.elastic.importance import ffn_orders, head_orders, random_importance
from engine.elastic.permutation import permute_column_groups, permute_rows, permute_weights
from engine.elastic.torch_model import TorchLlama
from engine.kernels.cpu.quantized_weights import QuantFormat, dequantize, quantize


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


def test_quantized_down_proj_moves_its_exact_values_dense() -> None:
    weight = quantize(torch.randn(16, 64), QuantFormat.Q4_1)
    neurons = torch.randperm(64)
    moved = permute_column_groups(weight, neurons, 1)
    assert isinstance(moved, torch.Tensor)
    assert torch.equal(moved, dequantize(weight)[:, neurons])
