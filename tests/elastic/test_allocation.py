"""Levels from importance: nested widths, anchors whole, budgets met, and the spec accepts them."""

from __future__ import annotations

import torch

from engine.elastic.allocation import AllocationConfig, allocate_levels
from engine.elastic.importance import Importance, head_orders
from engine.elastic.spec import ElasticSpec
from engine.model.arch import LlamaArchConfig

CONFIG = LlamaArchConfig(vocab_size=100, hidden_size=64, intermediate_size=256, num_layers=5, num_heads=6,
                         num_kv_heads=2, head_dim=16)


def importance() -> Importance:
    generator = torch.Generator().manual_seed(0)
    scale = torch.tensor([1.0, 5.0, 0.5, 2.0, 1.0])[:, None]  # layers differ in scale
    return Importance(torch.rand(5, 256, generator=generator, dtype=torch.float64) * scale,
                      torch.rand(5, 6, generator=generator, dtype=torch.float64) * scale, 4)


def levels(allocation: AllocationConfig):
    imp = importance()
    ffn = torch.argsort(imp.ffn, dim=1, descending=True)
    return allocate_levels(CONFIG, imp, ffn, head_orders(imp, 2), (1,), (100, 80, 60, 40), allocation)


def prunable_kept(level) -> int:
    hidden = CONFIG.hidden_size
    return sum(3 * hidden * w + 2 * hidden * CONFIG.head_dim * CONFIG.num_kv_heads * r
               for layer, (w, r) in enumerate(zip(level.ffn_widths, level.head_ranks)) if layer != 1)


def test_levels_are_nested_keep_anchors_whole_and_meet_their_budget() -> None:
    for allocation in (AllocationConfig(), AllocationConfig(per_layer=False), AllocationConfig(prune_heads=False)):
        built = levels(allocation)
        spec = ElasticSpec("x", 5, 64, 256, 6, 2, 16, 100, (1,), built)  # checks nesting, anchors, multiples
        full = prunable_kept(spec.levels[0])
        for level in spec.levels[1:]:
            assert prunable_kept(level) <= level.level / 100 * full + 1e-9
            assert prunable_kept(level) > level.level / 100 * full - 3 * 64 * 32 * 4  # not far below
            assert min(level.ffn_widths) >= 32 and min(level.head_ranks) >= 1


def test_head_order_is_rank_major_within_kv_groups() -> None:
    imp = Importance(torch.zeros(1, 4), torch.tensor([[0.1, 0.9, 0.5, 0.2, 0.7, 0.4]], dtype=torch.float64), 1)
    # groups: heads 0-2 (best 1, then 2, then 0) and 3-5 (best 4, then 5, then 3)
    assert head_orders(imp, 2).tolist() == [[1, 4, 2, 5, 0, 3]]
