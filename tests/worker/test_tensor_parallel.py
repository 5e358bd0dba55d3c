"""Tensor parallelism over torch.distributed (gloo): two rank processes, each holding half of every
weight and of the KV heads, give the tokens one process gives (fp32, the real model), on
ShareGPT prompts chunked and batched, and on a long prompt pruned by the ranks' summed scores
(elastic levels under TP: test_tensor_parallel_elastic.py)."""

from __future__ import annotations

import math
import os
import signal
import time

import pytest
import torch

from engine import LLM, SamplingParams
from engine.bench.datasets import first_exchange, load_sharegpt
from engine.config import ConfigError, ParallelConfig
from engine.kernels.cpu.quantized_weights import QuantFormat, dequantize, quantize
from engine.model.arch import LlamaArchConfig
from engine.model.loader import default_model_path, resolve_model
from engine.model.sharding import TensorParallelShard, split_evenly
from tests.conftest import assert_kv_empty, make_llm

PLAIN_FP32 = {"dtype": "float32", "weight_format": "dequantized", "elastic": "off", "max_num_batched_tokens": 64,
              "block_size": 16, "kv_cache_memory": 0.5}


@pytest.fixture(scope="module")
def one_process() -> LLM:
    return make_llm(**PLAIN_FP32)


@pytest.fixture(scope="module")
def two_ranks() -> LLM:
    llm = make_llm(**PLAIN_FP32, tensor_parallel_size=2)
    yield llm
    llm.shutdown()


def sharegpt_prompts(tokenizer, count: int, min_tokens: int, max_tokens: int) -> list[str]:
    prompts = []
    for record in load_sharegpt():
        exchange = first_exchange(record)
        if exchange and min_tokens <= len(tokenizer.encode(exchange[0])) <= max_tokens:
            prompts.append(exchange[0])
        if len(prompts) == count:
            return prompts
    raise AssertionError("not enough prompts")


def greedy(llm: LLM, prompts: list, max_tokens: int = 32, **kwargs) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    outputs = llm.generate(prompts, params, use_tqdm=False, **kwargs)
    assert_kv_empty(llm)
    return [output.outputs[0].token_ids for output in outputs]


def test_two_ranks_give_one_process_greedy_tokens(one_process, two_ranks):
    prompts = sharegpt_prompts(one_process.get_tokenizer(), 6, 8, 200)  # chunked at 64 tokens a step
    assert greedy(two_ranks, prompts) == greedy(one_process, prompts)
    assert two_ranks.engine.runner.num_kv_blocks == one_process.engine.runner.num_kv_blocks


def test_two_ranks_prune_a_long_prompt_as_one_process_does(one_process, two_ranks):
    """Each rank scores with its own heads; the all-reduced scores keep the same tokens."""
    tokenizer = one_process.get_tokenizer()
    long_prompt = " ".join(sharegpt_prompts(tokenizer, 12, 60, 200))
    assert len(tokenizer.encode(long_prompt)) >= 600
    one = one_process.generate([long_prompt], SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True),
                               use_tqdm=False, prompt_keep=0.5)[0]
    two = two_ranks.generate([long_prompt], SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True),
                             use_tqdm=False, prompt_keep=0.5)[0]
    assert one.prompt_keep < 1 and two.prompt_keep == one.prompt_keep
    assert two.num_prompt_tokens_computed_in_full == one.num_prompt_tokens_computed_in_full
    assert two.outputs[0].token_ids == one.outputs[0].token_ids
    assert_kv_empty(two_ranks)


def test_two_ranks_give_one_process_prompt_logprobs(one_process, two_ranks):
    """The vocabulary-parallel LM head's gathered logits score a prompt as the whole head does."""
    prompt = "The quick brown fox jumps over the lazy dog because it"
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    one = one_process.generate([prompt], params, use_tqdm=False)[0].prompt_logprobs
    two = two_ranks.generate([prompt], params, use_tqdm=False)[0].prompt_logprobs
    assert one[0] is None and two[0] is None
    for a, b in zip(one[1:], two[1:], strict=True):
        (token, la), = a.items()
        assert set(b) == {token} and math.isclose(la.logprob, b[token].logprob, abs_tol=1e-4)


def smollm2_arch() -> LlamaArchConfig:
    return resolve_model(str(default_model_path())).arch


def test_shards_split_heads_by_kv_group_neurons_and_vocabulary_in_blocks():
    arch = smollm2_arch()  # 9 query heads over 3 KV heads, 1536 neurons, 49152 ids
    ranks = [TensorParallelShard.for_rank(arch, rank, 2) for rank in range(2)]
    assert [s.kv_heads for s in ranks] == [(0, 2), (2, 3)]
    assert [s.query_heads for s in ranks] == [(0, 6), (6, 9)]
    assert [s.neurons for s in ranks] == [(0, 768), (768, 1536)]
    assert [s.vocab for s in ranks] == [(0, 24576), (24576, 49152)]
    assert ranks[1].local_arch.num_heads == 3 and ranks[1].local_arch.num_kv_heads == 1
    assert split_evenly(100, 3, unit=32) == ((0, 34), (34, 67), (67, 100))  # 100 is not whole blocks
    assert split_evenly(96 * 3 + 32, 3, unit=32) == ((0, 128), (128, 224), (224, 320))


def test_fewer_kv_heads_than_ranks_replicate_them():
    arch = LlamaArchConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=8,
                           num_kv_heads=2, head_dim=8)
    shards = [TensorParallelShard.for_rank(arch, rank, 4) for rank in range(4)]
    assert [s.kv_heads for s in shards] == [(0, 1), (0, 1), (1, 2), (1, 2)]
    assert [s.query_heads for s in shards] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    with pytest.raises(ConfigError, match="tensor_parallel_size 3"):
        TensorParallelShard.for_rank(arch, 0, 3)


def test_rank_cuts_reassemble_the_weight_quantized_and_dense():
    arch = smollm2_arch()
    torch.manual_seed(0)
    down = torch.randn(arch.hidden_size, arch.intermediate_size)
    blocks = quantize(down, QuantFormat.Q4_1)
    shards = [TensorParallelShard.for_rank(arch, rank, 2) for rank in range(2)]
    quantized = [dict(s.weights(iter([("model.layers.0.mlp.down_proj.weight", blocks)]))) for s in shards]
    dense = [dict(s.weights(iter([("model.layers.0.self_attn.q_proj.weight", down[:, :576].T.contiguous())])))
             for s in shards]
    name = "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(torch.cat([dequantize(q[name]) for q in quantized], dim=1), dequantize(blocks))
    q_name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(torch.cat([d[q_name] for d in dense]), down[:, :576].T)


def test_tensor_parallel_size_must_be_positive():
    with pytest.raises(ConfigError, match="tensor_parallel_size must be at least 1"):
        ParallelConfig(tensor_parallel_size=0)


def test_a_size_that_does_not_split_the_model_fails_before_any_rank_starts():
    with pytest.raises(ConfigError, match="tensor_parallel_size 4"):
        LLM(elastic="off", tensor_parallel_size=4)


def test_a_rank_that_dies_fails_the_next_step_at_once_naming_it(two_ranks):
    """Last in this module: it leaves `two_ranks` broken (the fixture's shutdown still ends it)."""
    runner = two_ranks.engine.runner
    os.kill(runner._processes[0].pid, signal.SIGKILL)
    runner._processes[0].join(timeout=10)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="tensor-parallel-rank-1 .exit code -9. died"):
        two_ranks.generate(["Hello"], SamplingParams(max_tokens=4), use_tqdm=False)
    assert time.monotonic() - start < 10
    two_ranks.shutdown()  # kills what is left of the ranks at once: no STOP to a rank mid-collective
    assert not torch.distributed.is_initialized() and not runner._processes[0].is_alive()
