"""The attention backend for CUDA tensors: the Triton KV-write, decode and prefill kernels.

Same contract as TorchAttentionBackend (engine/model/attention_backends/torch_backend.py): write this step's K/V at
slot_mapping, then attend. The batch's first num_decodes sequences (one query token each) go to
the flash-decoding kernel, the prefill chunks after them to the prefill kernel in one launch.
"""

from __future__ import annotations

import torch

from engine.kernels.kv_cache_write import kv_cache_write
from engine.kernels.paged_decode_attention import paged_decode_attention
from engine.kernels.paged_prefill_attention import paged_prefill_attention
from engine.model.attention_backends.metadata import AttentionMetadata, forward_rank_major_as_grouped


class TritonAttentionBackend:
    prefill_attends_level_heads = False  # the prefill kernel launches over every head

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, meta: AttentionMetadata,
                group_heads: torch.Tensor | None = None, rank_major: bool = False) -> torch.Tensor:
        """query [T, Hq, D], key/value [T, Hkv, D] -> output [T, Hq, D] (the contract: metadata.py)."""
        if rank_major:  # the kernels read grouped heads only
            return forward_rank_major_as_grouped(self.forward, query, key, value, kv_cache, meta, group_heads)
        kv_cache_write(key, value, kv_cache, meta.slot_mapping)
        output = torch.empty_like(query)
        num_decodes = meta.num_decodes
        if num_decodes:
            paged_decode_attention(query[:num_decodes], kv_cache, meta.block_tables[:num_decodes],
                                   meta.seq_lens[:num_decodes], meta.max_decode_seq_len,
                                   out=output[:num_decodes])
        if meta.num_seqs > num_decodes:
            # query_start_loc keeps absolute row numbers, so the prefill rows index `query` as is.
            paged_prefill_attention(query, kv_cache, meta.block_tables[num_decodes:],
                                    meta.seq_lens[num_decodes:], meta.query_start_loc[num_decodes:],
                                    meta.max_query_len, out=output)
        return output
