"""The attention backend for CPU tensors: decodes through the C++ kernel, prefill chunks through
the torch path it extends (whose matmuls already run near the CPU's peak on whole chunks)."""

from __future__ import annotations

import torch

from engine.kernels.cpu.paged_decode_attention import paged_decode_attention, supports
from engine.model.attention_backends.metadata import AttentionMetadata
from engine.model.attention_backends.torch_backend import TorchAttentionBackend, write_kv_cache


class NativeCpuAttentionBackend(TorchAttentionBackend):
    """Falls back to the torch path, per cache shape, where the kernel cannot run (no compiler,
    no AVX-512, an unsupported head size): `auto` never fails for want of it."""

    def __init__(self) -> None:
        self._supported: dict[tuple, bool] = {}

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, meta: AttentionMetadata,
                group_heads: torch.Tensor | None = None, rank_major: bool = False) -> torch.Tensor:
        # PERF: an all-decode step in rank-major slots goes to the kernel as it is; regrouping the
        # query and the output cost an elastic model's single stream ~0.5 ms a token (30 layers).
        if rank_major and meta.num_decodes == meta.num_seqs and self._kernel_runs(query, kv_cache):
            write_kv_cache(key, value, kv_cache, meta.slot_mapping)
            return self._kernel_decode(query, kv_cache, meta, group_heads, rank_major=True)
        return super().forward(query, key, value, kv_cache, meta, group_heads, rank_major)

    def _decode(self, query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                group_heads: torch.Tensor | None = None) -> torch.Tensor:
        if not self._kernel_runs(query, kv_cache):
            return super()._decode(query, kv_cache, meta, group_heads)
        return self._kernel_decode(query, kv_cache, meta, group_heads)

    def decodes_in_kernel(self, kv_cache: torch.Tensor, num_q_heads: int) -> bool:
        """Whether decode rows with this many query heads attend over this cache in the C++ kernel."""
        key = (tuple(kv_cache.shape), kv_cache.dtype, num_q_heads)
        if key not in self._supported:
            self._supported[key] = supports(kv_cache, num_q_heads)
        return self._supported[key]

    def _kernel_runs(self, query: torch.Tensor, kv_cache: torch.Tensor) -> bool:
        return self.decodes_in_kernel(kv_cache, query.shape[1])

    @staticmethod
    def _kernel_decode(query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                       group_heads: torch.Tensor | None, rank_major: bool = False) -> torch.Tensor:
        if query.stride(2) != 1 or query.stride(1) != query.shape[2]:
            query = query.contiguous()
        # The decode rows come first, so their group_heads are the first num_decodes entries.
        return paged_decode_attention(query, kv_cache, meta.block_tables, meta.seq_lens, group_heads=group_heads,
                                      rank_major=rank_major)
