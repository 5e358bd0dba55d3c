"""Elastic levels inside the model (engine/model/layers/elastic.py), on a tiny random Llama:

- column tiles cover each row's own width exactly, each column once;
- a level equals the plain model with the pruned neurons' and heads' weights zeroed;
- a batch that mixes levels (rows out of level order) gives every sequence what it gets alone.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from engine.elastic.runtime import layer_elasticities
from engine.elastic.torch_model import BlockCorrection, LayerCorrection
from engine.elastic.spec import ElasticLevel, ElasticSpec
from engine.model.arch import LlamaArchConfig
from engine.model.attention_backends.torch_backend import TorchAttentionBackend
from engine.model.compute_plan import ComputePlan, _can_prepack_bf16
from engine.model.forward_batch import ElasticRows, ForwardBatch
from engine.model.layers.elastic import column_tiles
from engine.model.layers.linear import ElasticSlices
from engine.model.layers.rotary import RotaryEmbedding
from engine.model.llama import LlamaForCausalLM
from tests.kernels.paged_batch import make_metadata
from tests.tiny_llama import random_hf_weights

CONFIG = LlamaArchConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=3, num_heads=4,
                         num_kv_heads=2, head_dim=16, max_position_embeddings=256)
SPEC = ElasticSpec(source_digest="tiny", num_layers=3, hidden_size=64, intermediate_size=128, num_heads=4,
                   num_kv_heads=2, head_dim=16, vocab_size=128, anchor_layers=(0,),
                   levels=(ElasticLevel(100, (128, 128, 128), (2, 2, 2)),
                           ElasticLevel(75, (128, 96, 64), (2, 2, 1)),
                           ElasticLevel(50, (128, 64, 32), (2, 1, 1))))
BLOCK_SIZE = 4


@pytest.mark.parametrize("widths", [(8, 6, 2), (8, 8, 4), (8, 4, 4), (4, 4, 4)])
@pytest.mark.parametrize("level_counts", [(3, 0, 2), (0, 0, 5), (1, 1, 1), (2, 3, 0), (0, 4, 1)])
def test_column_tiles_cover_each_row_once(widths: tuple[int, ...], level_counts: tuple[int, ...]) -> None:
    rows_upto = list(itertools.accumulate(level_counts))
    row_widths = [w for w, count in zip(widths, level_counts) for _ in range(count)]
    covered = [[0] * widths[0] for _ in row_widths]
    for num_rows, start, end in column_tiles(widths, rows_upto):
        for row in range(num_rows):
            for column in range(start, end):
                covered[row][column] += 1
    for row, width in enumerate(row_widths):
        assert covered[row] == [1] * width + [0] * (widths[0] - width)
    distinct = {count for count in rows_upto if count}
    assert len(column_tiles(widths, rows_upto)) <= len(distinct)


def test_elastic_slices_keep_each_parts_prefix_and_the_fixed_rows() -> None:
    gate_up = ElasticSlices("rows", (0, 8), (8, 6, 2))
    assert gate_up.index(8).tolist() == list(range(16))  # the full level: the whole weight, in order
    assert gate_up.index(2).tolist() == [0, 1, 8, 9]
    qkv = ElasticSlices("rows", (0,), (6, 3), fixed=(6, 10))
    assert qkv.index(3).tolist() == [0, 1, 2, 6, 7, 8, 9]
    assert gate_up.tile_bounds.bounds == (0, 2, 6, 8, 10, 14, 16)
    assert qkv.tile_bounds.bounds == (0, 3, 6, 10)


def rank_major(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """q rows and o_proj columns moved to rank-major head slots (slot r * Hkv + g <- head g * G + r)."""
    group, head_dim = CONFIG.num_heads // CONFIG.num_kv_heads, CONFIG.head_dim
    order = [(slot % CONFIG.num_kv_heads) * group + slot // CONFIG.num_kv_heads for slot in range(CONFIG.num_heads)]
    columns = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in order])
    out = dict(weights)
    for layer in range(CONFIG.num_layers):
        q, o = f"model.layers.{layer}.self_attn.q_proj.weight", f"model.layers.{layer}.self_attn.o_proj.weight"
        out[q], out[o] = weights[q][columns], weights[o][:, columns]
    return out


def random_corrections(seed: int) -> dict[int, list[LayerCorrection | None]]:
    """Random side paths for every block of the non-anchor layers at the two smaller levels."""
    generator = torch.Generator().manual_seed(seed)

    def block() -> BlockCorrection:
        return BlockCorrection(bias=torch.randn(64, generator=generator) * 0.01,
                               lora_a=torch.randn(2, 64, generator=generator) * 0.1,
                               lora_b=torch.randn(64, 2, generator=generator) * 0.1)

    return {level: [None, *[LayerCorrection(attn=block(), ffn=block()) for _ in (1, 2)]] for level in (75, 50)}


def build(weights: dict[str, torch.Tensor], corrections: dict[int, list[LayerCorrection | None]] | None
          ) -> LlamaForCausalLM:
    plan = ComputePlan.reference()
    layers = None if corrections is None else layer_elasticities(SPEC, corrections, torch.float32)
    model = LlamaForCausalLM(CONFIG, TorchAttentionBackend(), plan, layers)
    model.load_weights(weights.items())
    return model.eval()


def pruned_reference(weights: dict[str, torch.Tensor], level_index: int) -> dict[str, torch.Tensor]:
    """The plain (grouped-head) model with every weight the level drops zeroed."""
    out = {name: w.clone() for name, w in weights.items()}
    level, group, head_dim = SPEC.levels[level_index], SPEC.group_size, CONFIG.head_dim
    for layer in range(CONFIG.num_layers):
        out[f"model.layers.{layer}.mlp.down_proj.weight"][:, level.ffn_widths[layer]:] = 0
        o_proj = out[f"model.layers.{layer}.self_attn.o_proj.weight"]
        for kv_group, rank in itertools.product(range(CONFIG.num_kv_heads), range(level.head_ranks[layer], group)):
            head = kv_group * group + rank
            o_proj[:, head * head_dim:(head + 1) * head_dim] = 0
    return out


def run(model: LlamaForCausalLM, tokens: list[torch.Tensor], level_indices: list[int]) -> list[torch.Tensor]:
    """One prefill step of the sequences at their levels -> each sequence's final hidden rows."""
    lens = [len(t) for t in tokens]
    num_blocks = sum(-(-n // BLOCK_SIZE) for n in lens)
    block_tables = torch.zeros(len(lens), max(-(-n // BLOCK_SIZE) for n in lens), dtype=torch.int32)
    next_block = 0
    for seq, n in enumerate(lens):
        count = -(-n // BLOCK_SIZE)
        block_tables[seq, :count] = torch.arange(next_block, next_block + count)
        next_block += count
    meta, positions = make_metadata([0] * len(lens), lens, 0, BLOCK_SIZE, block_tables)
    row_levels = torch.tensor([index for index, n in zip(level_indices, lens) for _ in range(n)])
    elastic = None
    if model.is_elastic and row_levels.any():
        order = torch.argsort(row_levels, stable=True)
        counts = torch.bincount(row_levels, minlength=len(SPEC.levels)).cumsum(0)
        elastic = ElasticRows(order=order, inverse=torch.argsort(order), rows_upto=tuple(counts.tolist()),
                              row_levels=row_levels)
    batch = ForwardBatch(input_ids=torch.cat(tokens), positions=positions, attention=meta,
                         request_ids=[str(i) for i in range(len(lens))], logits_indices=torch.arange(sum(lens)),
                         elastic=elastic)
    dtype = model.plan.dtype
    caches = [torch.zeros(2, num_blocks, BLOCK_SIZE, CONFIG.num_kv_heads, CONFIG.head_dim, dtype=dtype)
              for _ in range(CONFIG.num_layers)]
    with torch.inference_mode():
        hidden = model(batch, caches)
    return list(hidden.split(lens))


TOKENS = [torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(n)) for n in (7, 5, 9)]


def test_full_level_of_rank_major_model_equals_plain_model() -> None:
    weights = random_hf_weights(CONFIG, seed=1)
    plain, elastic = build(weights, None), build(rank_major(weights), {})
    for got, want in zip(run(elastic, TOKENS, [0, 0, 0]), run(plain, TOKENS, [0, 0, 0])):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("level_index", [1, 2])
def test_level_equals_plain_model_with_pruned_weights_zeroed(level_index: int) -> None:
    weights = random_hf_weights(CONFIG, seed=2)
    elastic, reference = build(rank_major(weights), {}), build(pruned_reference(weights, level_index), None)
    levels = [level_index] * len(TOKENS)
    for got, want in zip(run(elastic, TOKENS, levels), run(reference, TOKENS, levels)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("levels", [[1, 0, 2], [2, 2, 0], [2, 1, 1], [0, 2, 1]])
def test_mixed_levels_give_each_sequence_its_own_level(levels: list[int]) -> None:
    model = build(rank_major(random_hf_weights(CONFIG, seed=3)), random_corrections(seed=4))
    mixed = run(model, TOKENS, levels)
    for seq, level_index in enumerate(levels):
        alone = run(model, [TOKENS[seq]], [level_index])[0]
        torch.testing.assert_close(mixed[seq], alone, atol=1e-5, rtol=1e-5)
    side_paths_off = build(rank_major(random_hf_weights(CONFIG, seed=3)), {})
    pruned_seq = next(seq for seq, level in enumerate(levels) if level)
    assert not torch.allclose(run(side_paths_off, TOKENS, levels)[pruned_seq], mixed[pruned_seq], atol=1e-4)


def bf16_plan(prepack: bool) -> ComputePlan:
    return ComputePlan(device=torch.device("cpu"), dtype=torch.bfloat16, weight_format="dequantized",
                       native_ops=False, prepack_bf16=prepack)


def build_bf16(weights: dict[str, torch.Tensor], prepack: bool) -> LlamaForCausalLM:
    model = LlamaForCausalLM(CONFIG, TorchAttentionBackend(), bf16_plan(prepack),
                             layer_elasticities(SPEC, random_corrections(seed=6), torch.bfloat16)).to(torch.bfloat16)
    model.rotary = RotaryEmbedding.for_config(CONFIG)  # fp32 tables, as the loader keeps them
    model.load_weights((name, w.to(torch.bfloat16)) for name, w in rank_major(weights).items())
    return model.eval()


@pytest.mark.skipif(not _can_prepack_bf16(), reason="oneDNN cannot prepack bf16 on this CPU (or under this mask)")
def test_prepacked_elastic_model_keeps_dense_views_only_where_levels_prune() -> None:
    """Anchor layers (whole at every level) keep one prepacked weight; pruned layers keep each
    level width's slice prepacked (the full level's too, with the side paths appended), and give
    what the unpacked model gives at every mix of levels."""
    weights = random_hf_weights(CONFIG, seed=5)
    packed, unpacked = build_bf16(weights, prepack=True), build_bf16(weights, prepack=False)
    anchor, pruned = packed.layers[0], packed.layers[1]
    for linear in (anchor.attention.wqkv, anchor.feed_forward.w13, anchor.feed_forward.w2):
        assert linear.packed is not None and linear.dense is None and linear.packed_levels is None
    assert anchor.feed_forward.elastic is None and anchor.attention.elastic is None
    for linear in (pruned.attention.wqkv, pruned.attention.wo, pruned.feed_forward.w13, pruned.feed_forward.w2):
        assert linear.dense is None and linear.packed is None
        assert set(linear.packed_levels) == set(linear.elastic.widths)  # one slice per distinct width
    for levels in ([0, 0, 0], [1, 0, 2], [2, 2, 2], [2, 0, 0], [1, 1, 1]):  # one level, and mixes
        for got, want in zip(run(packed, TOKENS, levels), run(unpacked, TOKENS, levels)):
            torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.skipif(not _can_prepack_bf16(), reason="oneDNN cannot prepack bf16 on this CPU (or under this mask)")
def test_a_large_mixed_step_runs_each_levels_rows_through_its_own_slices(monkeypatch) -> None:
    """From GROUPED_LEVELS_MIN_ROWS rows a step that mixes levels runs each level's rows through
    that level's slices, FFN and attention's (not every row at the widest): each sequence still
    gets what the unpacked model (column tiles) gives it, and what it gets alone, and no row runs
    wider."""
    from engine.model import llama

    weights = random_hf_weights(CONFIG, seed=7)
    packed, unpacked = build_bf16(weights, prepack=True), build_bf16(weights, prepack=False)
    tokens = [torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(n)) for n in (40, 30, 20)]
    layer = packed.layers[2]  # levels 75 and 50 keep 64 and 32 of its neurons, 1 head rank of 2
    watched = {layer.feed_forward.w13: "w13", layer.attention.wqkv: "wqkv", layer.attention.wo: "wo"}
    widths_run: dict[str, list[tuple[int, int]]] = {}
    forward_level = llama.Linear.forward_level

    def recording(self, x, width, bias=None):
        if self in watched:
            widths_run.setdefault(watched[self], []).append((x.shape[0], width))
        return forward_level(self, x, width, bias)

    monkeypatch.setattr(llama.Linear, "forward_level", recording)
    head_width = CONFIG.num_kv_heads * CONFIG.head_dim
    for levels in ([1, 0, 2], [2, 2, 0], [0, 2, 1]):
        widths_run.clear()
        mixed = run(packed, tokens, levels)
        rows_at = {lv: sum(len(t) for t, at in zip(tokens, levels) if at == lv) for lv in set(levels)}
        assert sorted(widths_run["w13"]) == sorted((n, SPEC.levels[lv].ffn_widths[2]) for lv, n in rows_at.items())
        heads = sorted((n, SPEC.levels[lv].head_ranks[2] * head_width) for lv, n in rows_at.items())
        assert sorted(widths_run["wqkv"]) == heads and sorted(widths_run["wo"]) == heads
        for seq, (got, want) in enumerate(zip(mixed, run(unpacked, tokens, levels))):
            # bf16 against the column tiles: a logit of ~1 is 1/128 apart per rounding.
            torch.testing.assert_close(got.float(), want.float(), atol=4e-2, rtol=2e-2)
            # Its own level's slices, as alone: the same GEMMs on the same rows, the same bits.
            assert torch.equal(got, run(packed, [tokens[seq]], [levels[seq]])[0])
