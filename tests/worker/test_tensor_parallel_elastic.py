"""Elastic levels under tensor parallelism (issue #17): each level's prefix split evenly across
the ranks (engine/elastic/tensor_parallel.py).  Its own module: one tensor-parallel engine per
process, and test_tensor_parallel.py's lives for its whole module."""

from __future__ import annotations

import pytest
import torch

from engine.config import ConfigError
from engine.elastic.spec import ElasticLevel, ElasticSpec
from engine.elastic.tensor_parallel import check_splits, local_spec, sharded_orders
from engine.model.arch import LlamaArchConfig
from engine.model.sharding import TensorParallelShard
from tests.conftest import make_llm
from tests.worker.test_tensor_parallel import PLAIN_FP32, greedy, sharegpt_prompts


def elastic_spec_for(arch: LlamaArchConfig, ffn_widths: tuple[int, ...], head_ranks: tuple[int, ...]) -> ElasticSpec:
    group = arch.num_heads // arch.num_kv_heads
    whole = ElasticLevel(100, (arch.intermediate_size,) * arch.num_layers, (group,) * arch.num_layers)
    small = ElasticLevel(40, ffn_widths, head_ranks)
    return ElasticSpec("x", arch.num_layers, arch.hidden_size, arch.intermediate_size, arch.num_heads,
                       arch.num_kv_heads, arch.head_dim, arch.vocab_size, (), (whole, small))


def test_each_rank_holds_an_even_share_of_every_level_in_its_own_importance_order():
    """The permuted weights' contiguous cut gives rank r the importance order's blocks r, r + N, ...
    and the heads of its KV groups rank-major: a level's prefix on a rank is the rank's part of
    the level's global prefix, and the ranks' shares differ by at most one block."""
    arch = LlamaArchConfig(vocab_size=64, hidden_size=64, intermediate_size=32 * 7, num_layers=1, num_heads=9,
                           num_kv_heads=3, head_dim=8)
    torch.manual_seed(0)
    ffn_orders, head_orders = torch.randperm(arch.intermediate_size)[None], torch.tensor([[4, 0, 8, 3, 2, 6, 5, 1, 7]])
    spec = elastic_spec_for(arch, (32 * 5,), (2,))
    ffn, heads = sharded_orders(ffn_orders, head_orders, arch, 2)
    global_prefix = set(ffn_orders[0, :32 * 5].tolist())
    shares = []
    for rank in range(2):
        shard = TensorParallelShard.for_rank(arch, rank, 2)
        local = local_spec(spec, shard)
        start, end = shard.neurons
        held = ffn[0, start:end]
        positions = [ffn_orders[0].tolist().index(n) for n in held.tolist()]
        assert positions == sorted(positions)  # the rank's own importance order
        width = local.levels[1].ffn_widths[0]
        assert set(held[:width].tolist()) == global_prefix & set(held.tolist())  # its share of the prefix
        shares.append(width)
        q_start, q_end = shard.query_heads
        g_start, g_end = shard.kv_heads
        # Local rank-major: slot r * local_groups + g holds group g's r-th best head.
        expected = [int(head_orders[0, r * 3 + g]) for r in range(3) for g in range(g_start, g_end)]
        assert heads[0, q_start:q_end].tolist() == expected
        assert local.levels[1].head_ranks == (2,) and local.num_kv_heads == g_end - g_start
    assert sorted(shares) == [64, 96] and sum(shares) == 32 * 5


def test_elastic_levels_that_cannot_split_evenly_are_refused():
    arch = LlamaArchConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=8,
                           num_kv_heads=2, head_dim=8)
    with pytest.raises(ConfigError, match="at least as many KV heads as ranks"):
        check_splits(elastic_spec_for(arch, (64,), (2,)), 4)
    with pytest.raises(ConfigError, match="fewer 32-neuron blocks than tensor_parallel_size 2"):
        check_splits(elastic_spec_for(arch, (32,), (2,)), 2)
    check_splits(elastic_spec_for(arch, (64,), (2,)), 2)


ELASTIC_FP32 = {**PLAIN_FP32, "elastic": "on"}


def test_two_ranks_give_one_process_elastic_tokens_at_mixed_levels():
    """Issue #17: elastic levels keep working under TP.  Six prompts, each at another level (out of
    level order, in one batch), give the tokens one elastic process gives them."""
    one = make_llm(**ELASTIC_FP32)
    levels = list(one.engine.elastic_levels)
    prompts = sharegpt_prompts(one.get_tokenizer(), 6, 8, 120)
    per_prompt = [levels[(i * 5) % len(levels)] for i in range(len(prompts))]
    assert len(set(per_prompt)) == len(levels) == 6
    want = greedy(one, prompts, elastic_level=per_prompt)
    del one
    two = make_llm(**ELASTIC_FP32, tensor_parallel_size=2)
    try:
        assert two.engine.elastic_levels == tuple(levels)
        assert greedy(two, prompts, elastic_level=per_prompt) == want
        ffn = two.engine.runner.model.layers[5].feed_forward  # rank 0's: half the neurons
        assert ffn.intermediate_size == 768 and ffn.elastic is not None
    finally:
        two.shutdown()
