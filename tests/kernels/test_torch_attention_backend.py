"""The torch attention backend's prefill under elastic levels: a chunk computes only its level's
query heads (the backend contract lets the others go unspecified; here they are zeros)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.model.attention_backends import torch_backend
from engine.model.attention_backends.metadata import TorchAttentionScratch
from engine.model.attention_backends.torch_backend import TorchAttentionBackend

from .paged_batch import make_metadata, random_block_tables, random_kv_cache

BLOCK_SIZE = 16
# Two decodes, then a chunk with earlier context, a fresh prompt and another chunk.
CONTEXT_LENS = [15, 40, 17, 0, 33]
QUERY_LENS = [1, 1, 20, 9, 12]
NUM_DECODES = 2
NUM_KV_HEADS, GROUP, HEAD_DIM = 2, 3, 64
# Head ranks per sequence (an elastic level keeps each KV group's first ranks); 3 = all.
SEQ_RANKS = [1, 2, 1, 3, 2]


def test_a_prefill_chunk_computes_only_its_levels_head_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    seq_lens = [c + q for c, q in zip(CONTEXT_LENS, QUERY_LENS)]
    block_tables = random_block_tables(seq_lens, BLOCK_SIZE, 16)
    meta, _ = make_metadata(CONTEXT_LENS, QUERY_LENS, NUM_DECODES, BLOCK_SIZE, block_tables)
    num_tokens = sum(QUERY_LENS)
    query = torch.randn(num_tokens, GROUP * NUM_KV_HEADS, HEAD_DIM)
    key, value = torch.randn(2, num_tokens, NUM_KV_HEADS, HEAD_DIM)
    cache = random_kv_cache(16, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, torch.float32)
    row_ranks = torch.tensor([r for r, q in zip(SEQ_RANKS, QUERY_LENS) for _ in range(q)], dtype=torch.int32)

    every_head = TorchAttentionBackend().forward(query, key, value, cache.clone(), meta, rank_major=True)
    heads_seen = []
    sdpa = F.scaled_dot_product_attention

    def counting_sdpa(q: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        heads_seen.append(q.shape[1])
        return sdpa(q, *args, **kwargs)

    monkeypatch.setattr(torch_backend.F, "scaled_dot_product_attention", counting_sdpa)
    meta.scratch = TorchAttentionScratch()
    out = TorchAttentionBackend().forward(query, key, value, cache.clone(), meta, group_heads=row_ranks,
                                          rank_major=True)

    # Each prefill chunk ran its own ranks' heads only: Hkv x ranks query heads.
    assert heads_seen == [NUM_KV_HEADS * r for r in SEQ_RANKS[NUM_DECODES:]]
    for row, ranks in enumerate(row_ranks.tolist()):
        kept = ranks * NUM_KV_HEADS  # rank-major: slot r * Hkv + g is group g's r-th head
        torch.testing.assert_close(out[row, :kept], every_head[row, :kept], atol=1e-6, rtol=1e-6)
        if row >= NUM_DECODES:  # a decode row computes every head here (the reference)
            assert torch.count_nonzero(out[row, kept:]) == 0
