"""Decoder layers' decode step (and one with small prefill chunks) as one C++ call
(engine/kernels/cpu/decode_layer.cpp), where the layers would run exactly those kernels anyway.

Why: a decode step of a few rows is ~12 kernel calls a layer, each wrapped in a few microseconds
of Python; on SmolLM2 (30 layers) that glue was ~2.6 ms of a ~9.5 ms single-stream step.  The
C++ call runs the same kernels in the same order, so each layer's output is the same bits
(tests/model/test_fused_decode.py).  One call a layer still cost ~40 us of Python a layer
(asking, argument structures, buffers, ctypes): ~1.2 ms of a 16-row step on the AMD EPYC.  So
the model's forward hands the C++ call a run of consecutive layers that each qualify
(`fused_run`; runs end at prune layers, where a batch's rows may change, and at a layer
that does not qualify), and the call steps through them.

Where a step and a layer qualify (`FusedDecode.step_runs`, `.layer_runs`; otherwise the layer runs
layer by layer):
  - every row is a decode (one token), or the step's prefill chunks are small (ONE_CALL_* below):
    a chunk's tokens then enter as rows of their own, each attending over its causal prefix (its
    sequence's block table, its own context length), so the call is not the same bits as the
    layer-by-layer path there, whose prefill attention runs whole-chunk matmuls;
  - rows at elastic levels below the full one only where every elastic linear of the layer has
    column views (no permuted inputs: a plan with Q8 activations re-blocks them, linear.py);
    the C++ call then runs the tile path of engine/model/layers/elastic.py, side paths included;
  - the native layer ops run (plan.native_ops), and every linear of the layer runs its quantized
    blocks at this row count (Linear.runs_blocks: a dense or prepacked step does not qualify);
  - attention is the native CPU backend's decode kernel for this cache;
  - no tensor parallelism, and no prompt for the layer to score (prompt pruning).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from engine.kernels.cpu import decode_layer as kernel
from engine.kernels.cpu.native_library import DTYPE_CODES
from engine.kernels.cpu.quantized_linear_q8 import vnni_available
from engine.kernels.kv_cache_format import is_int8
from engine.model.attention_backends.metadata import AttentionMetadata
from engine.model.attention_backends.native_cpu_backend import NativeCpuAttentionBackend
from engine.model.compute_plan import ComputePlan
from engine.model.forward_batch import ForwardBatch
from engine.model.layers.elastic import BlockElasticity
from engine.model.layers.linear import Linear
from engine.scheduler.cost_model import OneCallSteps


# A step holding prefill chunks takes the one-call path within these bounds (OneCallSteps; the
# plan's dense threshold may lower the rows).  Each chunk token then attends like a decode row
# over its own causal prefix (the paged decode kernel, fp32 arithmetic), where the layer-by-layer
# path attends a whole chunk with bf16 matmuls.  Measured on a 2-vCPU Xeon with AMX (SmolLM2,
# elastic, auto plan; step ms, layer by layer -> one call): 16 decodes + a 2-token prompt 37.5 ->
# 27.7 (16 decodes alone 25.8), + 8 tokens at 256 40.9 -> 31.8, + 16 at 256 44.7 -> 37.3; 32
# tokens at 512 (17k pairs) 37.8 -> 37.8, 24 at 1,024 beside 8 decodes (25k) 50.9 -> 50.4, 16 at
# 2,048 (33k) 41.6 -> 44.6, 32 at 2,048 (67k) 54 -> 77.  The layer-by-layer path's ~10 ms a step
# is what a one-call step saves; its attention costs ~0.4 us a pair more there (the step cost
# model's per_one_call_prefill_pair_s).  A level below 100 attends with fewer query heads, so the
# one call gains more: 10 decodes + 16 tokens at 1,024-1,500 keys (17k-24k pairs) 0.88-0.93x the
# layer-by-layer time at level 100, 0.78-0.83x at 70, 0.74-0.80x at 40.  On a 2-vCPU AMD EPYC
# (AVX512-BF16, no AMX; benchmarks/README.md, 2026-12-06) the one call is faster still: alone or
# beside 10 decodes, 8 or 16 tokens at 512-3,072 keys (4k-49k pairs) 0.62-0.90x at level 100 and
# 0.45-0.81x at 40; 32 tokens beside 16 decodes (48 rows) even at 34k-67k.  So the pairs bound is
# where the Xeon's full level breaks even (~25k).
ONE_CALL_MAX_ROWS = 64
ONE_CALL_MAX_PREFILL_PAIRS = 24_576


class FusedDecode:
    """The one-call path of a decoder layer (duck-typed: attention_norm, attention.{wqkv, attn, wo},
    ffn_norm, feed_forward.{w13, w2}, tp).

    Invariant: the layer's weights and KV caches stay where they were loaded and allocated.  The
    C++ call's arguments hold their addresses, taken at the first fused step (the weights load
    after construction)."""

    def __init__(self, layer, plan: ComputePlan) -> None:
        self.layer, self.plan = layer, plan
        self.limits = one_call_steps(plan)  # the steps with prefill chunks this layer takes
        self._arguments: kernel.LayerArguments | None = None
        self._level_tables: list = []  # what the level arguments point into, kept alive
        # The row count last asked about and whether every linear runs its blocks at it; the KV
        # cache tensor last asked about and whether the C++ attention runs over it.
        self._blocks_rows, self._blocks_run = -1, False
        self._kernel_cache: tuple | None = None
        self._kernel_cache_runs = False
        # The runs of layers from this one that steps took in one call (_layer_stack): a few, as
        # prune layers and scoring layers end runs.
        self.stacks: dict[tuple, kernel.LayerStack] = {}

    @functools.cached_property
    def runs_levels(self) -> bool:
        """Whether rows below the full level may take this path (asked after the weights loaded):
        tiles need column views, and a linear whose inputs are gathered into stored order has none."""
        attention, ffn = self.layer.attention, self.layer.feed_forward
        blocks = ((attention.elastic, (attention.wqkv, attention.wo)), (ffn.elastic, (ffn.w13, ffn.w2)))
        return all(block is None or all(linear.quantized_input_order is None for linear in linears)
                   for block, linears in blocks)

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

    def step_runs(self, x: torch.Tensor, residual: torch.Tensor | None, batch: ForwardBatch) -> bool:
        """What a step must be for any layer of the model to take the call (the same for every
        layer: one plan, one set of limits)."""
        meta = batch.attention
        if meta.num_decodes != meta.num_seqs and not _prefill_fits_step(meta, self.limits):
            return False
        return x.is_contiguous() and (residual is None or residual.is_contiguous())

    def layer_runs(self, rows: int, kv_cache: torch.Tensor, batch: ForwardBatch) -> bool:
        """Whether this layer takes the call in a step that qualifies (step_runs)."""
        # PERF: every layer of every step asks, so what holds for a layer at a row count or cache
        # is asked once a change.
        if batch.elastic is not None and not self.runs_levels:
            return False
        scorer = self.layer.attention.attn.scorer
        if scorer is not None and scorer.scores_in(batch):
            return False
        if self._blocks_rows != rows:
            self._blocks_run = all(linear.runs_blocks(rows) for linear in self._linears())
            self._blocks_rows = rows
        if not self._blocks_run:
            return False
        cache = (kv_cache.data_ptr(), kv_cache.shape)  # not the tensor: a cache let go stays let go
        if self._kernel_cache != cache:
            attention = self.layer.attention.attn
            self._kernel_cache_runs = attention.backend.decodes_in_kernel(kv_cache, attention.num_heads)
            self._kernel_cache = cache
        return self._kernel_cache_runs

    @staticmethod
    def run_layers(layers: Sequence[FusedDecode], x: torch.Tensor, residual: torch.Tensor | None,
                   kv_caches: Sequence[torch.Tensor], batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Consecutive layers (a `fused_run`: each takes the call this step) in one C++ call, each
        over its own cache: (out, residual) as the last layer's DecoderLayer.forward returns them."""
        step = _step_arguments(batch, x.dtype, layers[0].plan.q8_above_rows)
        step.kv_int8 = int(is_int8(kv_caches[0]))
        out, attention_out, spare = torch.empty_like(x), torch.empty_like(x), torch.empty_like(x)
        kernel.decode_layers(_layer_stack(layers, kv_caches), step, x, residual, attention_out, out, spare)
        return out, x if residual is None else residual

    def arguments(self, kv_cache: torch.Tensor) -> kernel.LayerArguments:
        """The layer's C++ arguments, built at its first fused step (the weights load after
        construction)."""
        if self._arguments is None:
            self._arguments = self._layer_arguments(block_size=kv_cache.shape[2])
        return self._arguments

    def _layer_arguments(self, block_size: int) -> kernel.LayerArguments:
        layer = self.layer
        attention = layer.attention.attn
        linears = [kernel.linear_arguments(linear.quantized, linear.bias, linear.quantized_input_order)
                   for linear in self._linears()]
        attention_levels = self._level_arguments(layer.attention.elastic)
        ffn_levels = self._level_arguments(layer.feed_forward.elastic)
        num_levels = max(len(levels) if levels is not None else 0 for levels in (attention_levels, ffn_levels))
        return kernel.LayerArguments(
            *linears, attention_levels, ffn_levels, num_levels, layer.attention_norm.weight.data_ptr(),
            layer.ffn_norm.weight.data_ptr(),
            layer.attention_norm.eps, attention.head_dim ** -0.5, layer.attention_norm.weight.shape[0],
            attention.num_heads, attention.num_kv_heads, attention.head_dim, layer.feed_forward.intermediate_size,
            block_size, int(attention.rank_major))


    def _level_arguments(self, block: BlockElasticity | None):
        """The block's levels as a C array (None for a block every level runs whole)."""
        if block is None:
            return None
        levels = (kernel.LevelArguments * len(block.widths))()
        for index, (width, path) in enumerate(zip(block.widths, block.side_paths)):
            lora_a, lora_b_rows = (None, None) if path is None else path.kernel_operands
            bias = None
            if path is not None and path.bias is not None:
                bias = path.bias.to(self.plan.dtype).contiguous()
            self._level_tables += [t for t in (lora_a, lora_b_rows, bias) if t is not None]
            levels[index] = kernel.LevelArguments(width, _address(lora_a), _address(lora_b_rows), _address(bias),
                                                  0 if lora_a is None else lora_a.shape[0])
        self._level_tables.append(levels)
        return levels


def _address(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def fused_run(layers: Sequence, start: int, stop: int, x: torch.Tensor, residual: torch.Tensor | None,
              kv_caches: Sequence[torch.Tensor], batch: ForwardBatch) -> list[FusedDecode]:
    """The fused paths of layers[start:stop] that take the one call this step, in a row from
    `start` ([]: layers[start] runs layer by layer).  The step is asked once, with the run's
    input: every fused layer's output has its input's rows and is contiguous."""
    first = layers[start].fused_decode
    if first is None or not first.step_runs(x, residual, batch):
        return []
    run, rows = [], x.shape[0]
    for index in range(start, stop):
        fused = layers[index].fused_decode
        if fused is None or not fused.layer_runs(rows, kv_caches[index], batch):
            break
        run.append(fused)
    return run


def _layer_stack(layers: Sequence[FusedDecode], kv_caches: Sequence[torch.Tensor]) -> kernel.LayerStack:
    """The run's C++ arguments, kept by its first layer (the run's other layers are the ones after
    it in the same model, so its length names them)."""
    # Caches by address and shape, not the tensors: a cache let go stays let go.
    key = (len(layers), tuple((cache.data_ptr(), cache.shape) for cache in kv_caches))
    stacks = layers[0].stacks
    stack = stacks.get(key)
    if stack is None:
        stack = kernel.LayerStack([layer.arguments(cache) for layer, cache in zip(layers, kv_caches)],
                                  [cache[0].data_ptr() for cache in kv_caches],
                                  [cache[1].data_ptr() for cache in kv_caches])
        stacks[key] = stack
    return stack


# One step's arguments, shared by every layer of the step (and rebuilt where prompt pruning moves
# the rows to another KV group or position table): keyed by the metadata and tables themselves.
_last_step: list = [None, None, None, None, None, None]  # [batch, meta, rope, key, StepArguments, what it points into]


def _step_arguments(batch: ForwardBatch, dtype: torch.dtype, q8_above_rows: int | None) -> kernel.StepArguments:
    """Elastic rows out of level order: the step's per-row arrays are handed over in level order
    (copies, made once a step), and the C++ call permutes each layer's rows to match."""
    key = (dtype, q8_above_rows, torch.get_num_threads())
    meta, rope, rows = batch.attention, batch.rope, batch.elastic
    if _last_step[0] is batch and _last_step[1] is meta and _last_step[2] is rope and _last_step[3] == key:
        return _last_step[4]
    order = None if rows is None else rows.order
    tables, lengths = _per_row_context(meta)
    slots, cos, sin = meta.slot_mapping, rope.cos, rope.sin
    if order is not None:
        slots, tables, lengths, cos, sin = (t.index_select(0, order).contiguous()
                                            for t in (slots, tables, lengths, cos, sin))
    rows_upto = None if rows is None else torch.tensor(rows.rows_upto, dtype=torch.int64)
    step = kernel.StepArguments(
        lengths.shape[0], cos.data_ptr(), sin.data_ptr(), slots.data_ptr(), tables.data_ptr(), tables.stride(0),
        lengths.data_ptr(), None, None, _address(rows_upto), _address(order),
        -1 if q8_above_rows is None else q8_above_rows, DTYPE_CODES[dtype],
        int(q8_above_rows is not None and vnni_available()), key[2])
    _last_step[:] = [batch, meta, rope, key, step, (slots, tables, lengths, cos, sin, rows_upto, order)]
    return step


def one_call_steps(plan: ComputePlan) -> OneCallSteps:
    """The steps with prefill chunks a fused layer runs in one call under this plan (the same test
    as `_prefill_fits`, on the scheduler's step features)."""
    max_rows = ONE_CALL_MAX_ROWS if plan.dense_above_rows is None else min(ONE_CALL_MAX_ROWS, plan.dense_above_rows)
    return OneCallSteps(max_rows, ONE_CALL_MAX_PREFILL_PAIRS)


_last_fits: list = [None, None, False]  # [metadata, limits, _prefill_fits of them]


def _prefill_fits_step(meta: AttentionMetadata, limits: OneCallSteps) -> bool:
    """_prefill_fits, computed once a step (every layer asks with the step's metadata)."""
    if _last_fits[0] is not meta or _last_fits[1] != limits:
        _last_fits[:] = [meta, limits, _prefill_fits(meta, limits)]
    return _last_fits[2]


def _prefill_fits(meta: AttentionMetadata, limits: OneCallSteps) -> bool:
    """Whether a step with prefill chunks is within `limits`: its rows, and its chunks' query x key
    pairs (q tokens with context length L: q * L, StepFeatures' count)."""
    starts, lengths = meta.query_start_loc_cpu, meta.seq_lens_cpu
    pairs = sum((starts[i + 1] - starts[i]) * lengths[i] for i in range(meta.num_decodes, meta.num_seqs))
    return limits.fits(starts[-1], pairs)


def _per_row_context(meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
    """(block tables, context lengths), one row per token: a decode is its sequence's row; token j
    of a chunk of q tokens with context length L reads its sequence's blocks up to position
    L - q + j, which is exactly causal attention within the chunk, because the call writes every
    row's K/V to the cache before any row attends (decode_layer.cpp)."""
    if meta.num_decodes == meta.num_seqs:
        return meta.block_tables, meta.seq_lens
    starts, lengths = meta.query_start_loc_cpu, meta.seq_lens_cpu
    query_lens = [end - start for start, end in zip(starts, starts[1:])]
    sequence_of_row = torch.repeat_interleave(torch.arange(meta.num_seqs), torch.tensor(query_lens))
    context = [length - query_len + 1 + j for length, query_len in zip(lengths, query_lens) for j in range(query_len)]
    return (meta.block_tables.index_select(0, sequence_of_row).contiguous(),
            torch.tensor(context, dtype=meta.seq_lens.dtype))
