"""A decoder layer's all-decode step as one C++ call (engine/kernels/cpu/decode_layer.cpp), where
the layer would run exactly those kernels anyway.

Why: a decode step of a few rows is ~12 kernel calls a layer, each wrapped in a few microseconds
of Python; on SmolLM2 (30 layers) that glue was ~2.6 ms of a ~9.5 ms single-stream step.  The
C++ call runs the same kernels in the same order, so the layer's output is the same bits
(tests/model/test_fused_decode.py).

When a step qualifies (`FusedDecode.runs`), otherwise the layer runs layer by layer:
  - every row is a decode (one token), and the batch has no per-row elastic levels;
  - the native layer ops run (plan.native_ops), and every linear of the layer runs its quantized
    blocks at this row count (Linear.runs_blocks: a dense or prepacked step does not qualify);
  - attention is the native CPU backend's decode kernel for this cache;
  - no tensor parallelism, and no prompt for the layer to score (prompt pruning).
"""

from __future__ import annotations

import torch

from engine.kernels.cpu import decode_layer as kernel
from engine.kernels.cpu.native_library import DTYPE_CODES
from engine.kernels.cpu.quantized_linear_q8 import vnni_available
from engine.model.attention_backends.metadata import AttentionMetadata
from engine.model.attention_backends.native_cpu_backend import NativeCpuAttentionBackend
from engine.model.compute_plan import ComputePlan
from engine.model.forward_batch import ForwardBatch
from engine.model.layers.linear import Linear
from engine.model.layers.rotary import RopeTables


class FusedDecode:
    """The one-call path of a decoder layer (duck-typed: attention_norm, attention.{wqkv, attn, wo},
    ffn_norm, feed_forward.{w13, w2}, tp).

    Invariant: the layer's weights stay where they were loaded.  The C++ call's arguments hold
    their addresses, taken at the first fused step (the weights load after construction)."""

    def __init__(self, layer, plan: ComputePlan) -> None:
        self.layer, self.plan = layer, plan
        self._arguments: kernel.LayerArguments | None = None

    @staticmethod
    def for_layer(layer, plan: ComputePlan) -> FusedDecode | None:
        """The layer's fused path, or None where no step can take it (no native kernels, dense
        weights, another attention backend, tensor parallelism)."""
        attention = layer.attention.attn
        if (not plan.native_ops or not plan.quantized or layer.tp is not None or not kernel.is_available()
                or not isinstance(attention.backend, NativeCpuAttentionBackend)):
            return None
        return FusedDecode(layer, plan)

    def _linears(self) -> tuple[Linear, Linear, Linear, Linear]:
        attention, ffn = self.layer.attention, self.layer.feed_forward
        return attention.wqkv, attention.wo, ffn.w13, ffn.w2

    def runs(self, x: torch.Tensor, residual: torch.Tensor | None, kv_cache: torch.Tensor,
             batch: ForwardBatch) -> bool:
        meta, rows = batch.attention, x.shape[0]
        if meta.num_decodes != rows or meta.num_seqs != rows or batch.elastic is not None:
            return False
        scorer = self.layer.attention.attn.scorer
        if scorer is not None and scorer.scores_in(batch):
            return False
        if not all(linear.runs_blocks(rows) for linear in self._linears()):
            return False
        if not x.is_contiguous() or (residual is not None and not residual.is_contiguous()):
            return False
        return self.layer.attention.attn.backend.decodes_in_kernel(kv_cache, self.layer.attention.attn.num_heads)

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None, kv_cache: torch.Tensor,
                 batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(out, residual) as DecoderLayer.forward returns them."""
        if self._arguments is None:
            self._arguments = self._layer_arguments(block_size=kv_cache.shape[2])
        step = _step_arguments(batch.attention, batch.rope, x.dtype, self.plan.runs_q8(x.shape[0]))
        step.key_cache, step.value_cache = kv_cache[0].data_ptr(), kv_cache[1].data_ptr()
        out, attention_out = torch.empty_like(x), torch.empty_like(x)
        kernel.decode_layer(self._arguments, step, x, residual, attention_out, out)
        return out, x if residual is None else residual

    def _layer_arguments(self, block_size: int) -> kernel.LayerArguments:
        layer = self.layer
        attention = layer.attention.attn
        linears = [kernel.linear_arguments(linear.quantized, linear.bias, linear.quantized_input_order)
                   for linear in self._linears()]
        return kernel.LayerArguments(
            *linears, layer.attention_norm.weight.data_ptr(), layer.ffn_norm.weight.data_ptr(),
            layer.attention_norm.eps, attention.head_dim ** -0.5, layer.attention_norm.weight.shape[0],
            attention.num_heads, attention.num_kv_heads, attention.head_dim, layer.feed_forward.intermediate_size,
            block_size, int(attention.rank_major))


# One step's arguments, shared by every layer of the step (and rebuilt where prompt pruning moves
# the rows to another KV group or position table): keyed by the metadata and tables themselves.
_last_step: list = [None, None, None, None]  # [meta, rope, key, StepArguments]


def _step_arguments(meta: AttentionMetadata, rope: RopeTables, dtype: torch.dtype, runs_q8: bool
                    ) -> kernel.StepArguments:
    key = (dtype, runs_q8, torch.get_num_threads())
    if _last_step[0] is meta and _last_step[1] is rope and _last_step[2] == key:
        return _last_step[3]
    step = kernel.StepArguments(
        len(meta.seq_lens_cpu), rope.cos.data_ptr(), rope.sin.data_ptr(), meta.slot_mapping.data_ptr(),
        meta.block_tables.data_ptr(), meta.block_tables.stride(0), meta.seq_lens.data_ptr(), None, None,
        DTYPE_CODES[dtype], int(runs_q8), int(runs_q8 and vnni_available()), key[2])
    _last_step[:] = [meta, rope, key, step]
    return step
