"""The Triton backend against the torch backend: one attention call, then a whole tiny Llama."""

from __future__ import annotations

import pytest
import torch

from engine.kernels.kv_cache_format import from_cache_rows, quantize_rows, row_size, storage_dtype
from engine.model.attention_backends.triton_backend import TritonAttentionBackend
from engine.model.arch import LlamaArchConfig
from engine.model.llama import LlamaForCausalLM
from tests.tiny_llama import forward, tiny_llama
from engine.model.attention_backends.metadata import TorchAttentionScratch
from engine.model.attention_backends.torch_backend import TorchAttentionBackend

from .paged_batch import make_metadata, random_block_tables, random_kv_cache

BLOCK_SIZE = 16
# A mixed step: three decodes (contexts at/across block boundaries), then prefill chunks with
# earlier context, a fresh prefill, and a single-token chunk.
CONTEXT_LENS = [15, 16, 40, 17, 0, 33]
QUERY_LENS = [1, 1, 1, 20, 9, 1]
NUM_DECODES = 3


@pytest.mark.parametrize("int8_cache", [False, True], ids=["model-dtype-cache", "int8-cache"])
@pytest.mark.parametrize("dtype, num_q_heads, num_kv_heads, head_dim", [
    (torch.float32, 6, 2, 64),
    (torch.bfloat16, 8, 1, 128),
])
def test_forward_matches_torch_backend(dtype: torch.dtype, num_q_heads: int, num_kv_heads: int,
                                       head_dim: int, int8_cache: bool) -> None:
    seq_lens = [c + q for c, q in zip(CONTEXT_LENS, QUERY_LENS)]
    num_blocks = 16
    block_tables = random_block_tables(seq_lens, BLOCK_SIZE, num_blocks)
    meta, _ = make_metadata(CONTEXT_LENS, QUERY_LENS, NUM_DECODES, BLOCK_SIZE, block_tables)
    num_tokens = sum(QUERY_LENS)
    query = torch.randn(num_tokens, num_q_heads, head_dim).to(dtype)
    key = torch.randn(num_tokens, num_kv_heads, head_dim).to(dtype)
    value = torch.randn(num_tokens, num_kv_heads, head_dim).to(dtype)
    torch_cache = random_kv_cache(num_blocks, BLOCK_SIZE, num_kv_heads, head_dim, dtype)
    if int8_cache:  # both backends then write this step's rows with the same bytes
        torch_cache = quantize_rows(torch_cache)
    triton_cache = torch_cache.clone()
    expected = TorchAttentionBackend().forward(query, key, value, torch_cache, meta)
    meta.scratch = TorchAttentionScratch()
    out = TritonAttentionBackend().forward(query, key, value, triton_cache, meta)
    assert torch.equal(triton_cache, torch_cache)
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(out.float(), expected.float(), **tolerance)


def test_rank_major_heads_match_the_torch_backend() -> None:
    """An elastic model's rank-major query slots: the Triton path regroups around its kernels and
    gives the torch backend's result in the same slots."""
    seq_lens = [c + q for c, q in zip(CONTEXT_LENS, QUERY_LENS)]
    block_tables = random_block_tables(seq_lens, BLOCK_SIZE, 16)
    meta, _ = make_metadata(CONTEXT_LENS, QUERY_LENS, NUM_DECODES, BLOCK_SIZE, block_tables)
    num_tokens = sum(QUERY_LENS)
    query, key, value = (torch.randn(num_tokens, heads, 64) for heads in (6, 2, 2))
    cache = random_kv_cache(16, BLOCK_SIZE, 2, 64, torch.float32)
    expected = TorchAttentionBackend().forward(query, key, value, cache.clone(), meta, rank_major=True)
    meta.scratch = TorchAttentionScratch()
    out = TritonAttentionBackend().forward(query, key, value, cache.clone(), meta, rank_major=True)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    meta.scratch = TorchAttentionScratch()
    grouped = TorchAttentionBackend().forward(query, key, value, cache.clone(), meta)
    assert not torch.allclose(out, grouped)  # rank-major is not the grouped reading


def tiny_llama_pair() -> tuple[LlamaForCausalLM, LlamaForCausalLM, LlamaArchConfig]:
    config = LlamaArchConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_layers=2,
                             num_heads=4, num_kv_heads=2, head_dim=32, max_position_embeddings=256)
    return tiny_llama(config, TorchAttentionBackend()), tiny_llama(config, TritonAttentionBackend()), config


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
def test_tiny_llama_forward_matches_torch_backend(kv_cache_dtype: str) -> None:
    """Step 1 prefills every sequence's context; step 2 runs decodes and prefill chunks on top of
    it. Each backend fills its own cache, so step 2 also checks what step 1 wrote.  An int8 cache
    may round a value one step apart where the backends' K differ in their last fp32 bits."""
    torch_model, triton_model, config = tiny_llama_pair()
    seq_lens = [c + q for c, q in zip(CONTEXT_LENS, QUERY_LENS)]
    num_blocks = 16
    block_tables = random_block_tables(seq_lens, BLOCK_SIZE, num_blocks)
    token_ids = [torch.randint(0, config.vocab_size, (n,)) for n in seq_lens]

    def new_caches() -> list[torch.Tensor]:
        shape = (2, num_blocks, BLOCK_SIZE, config.num_kv_heads, row_size(config.head_dim, kv_cache_dtype))
        dtype = storage_dtype(torch.float32, kv_cache_dtype)
        return [torch.zeros(shape, dtype=dtype) for _ in range(config.num_layers)]

    tolerance = dict(atol=1e-4, rtol=1e-4) if kv_cache_dtype == "auto" else dict(atol=2e-2, rtol=2e-2)

    caches = {"torch": new_caches(), "triton": new_caches()}
    models = {"torch": torch_model, "triton": triton_model}
    has_context = [seq for seq, c in enumerate(CONTEXT_LENS) if c]
    steps = [
        ([0] * len(has_context), [CONTEXT_LENS[seq] for seq in has_context], 0, has_context),
        (CONTEXT_LENS, QUERY_LENS, NUM_DECODES, list(range(len(seq_lens)))),
    ]
    for context_lens, query_lens, num_decodes, seqs in steps:
        hidden = {}
        for name, model in models.items():
            meta, positions = make_metadata(context_lens, query_lens, num_decodes, BLOCK_SIZE, block_tables[seqs])
            input_ids = torch.cat([token_ids[seq][c:c + q] for seq, c, q in zip(seqs, context_lens, query_lens)])
            hidden[name] = forward(model, input_ids, positions, caches[name], meta)
        torch.testing.assert_close(hidden["triton"], hidden["torch"], **tolerance)
    for torch_cache, triton_cache in zip(caches["torch"], caches["triton"]):
        torch.testing.assert_close(from_cache_rows(triton_cache, torch.float32), from_cache_rows(torch_cache, torch.float32),
                                   **(dict(atol=1e-5, rtol=1e-5) if kv_cache_dtype == "auto" else tolerance))
