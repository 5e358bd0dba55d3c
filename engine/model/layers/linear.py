"""Linear layers and the token embedding, in whichever weight format the ComputePlan chose.

A weight arrives once, at load, as a float tensor or as quantized blocks (QuantizedWeight: the
GGUF file's own Q4_0/Q4_1/Q8_0 blocks, or int8 blocks quantized here from a float checkpoint),
and is stored in one of three forms:

    form        stored as                               forward
    ---------   -------------------------------------   -------------------------------------
    dense       [out, in] in the plan dtype             F.linear
    prepacked   oneDNN's blocked layout of the same     mkldnn _linear_pointwise (bf16 on CPU)
    quantized   QuantizedWeight blocks                  the C++ quantized linear (fp32 accumulate),
                                                        or with Q8 activations (plan.runs_q8)

PERF (prepacked): F.linear re-lays-out a bf16 weight for oneDNN on every call.  Packing once at
load made the model's GEMMs 15-45% faster at 64 rows (the 576 -> 3072 gate/up projection: 0.43 ->
0.28 ms) with bit-identical results.  Only where the probe says oneDNN prepacks bf16: torch's own
check reads the hardware, not the engine's feature mask.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engine.distributed.group import TensorParallelGroup
from engine.kernels.cpu.quantized_linear import quantized_linear
from engine.kernels.cpu.quantized_linear_q8 import pack_panels, quantized_linear_q8
from engine.kernels.cpu.quantized_weights import (BLOCK_SIZE, InputPermutedBlocks, QuantFormat, QuantizedWeight,
                                                  dequantize, quantize)
from engine.model.compute_plan import ComputePlan
from engine.model.forward_batch import ForwardBatch

LinearWeight = torch.Tensor | QuantizedWeight | InputPermutedBlocks


@dataclass(frozen=True)
class TileBounds:
    """Where an elastic layer's tiles (engine/model/layers/elastic.py) may start and end: offsets
    along the weight's rows (out features: gate/up, q) or columns (in features: down, o_proj),
    ascending from 0 to the full size.  Every tile is a run of consecutive segments between them."""

    axis: str  # "rows" or "columns"
    bounds: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.axis not in ("rows", "columns") or list(self.bounds) != sorted(set(self.bounds)) or self.bounds[0] != 0:
            raise ValueError(f"tile bounds must be ascending from 0 along rows or columns, got {self}")

    @functools.cached_property
    def _index(self) -> dict[int, int]:  # PERF: segments runs per tile, layer and step
        return {bound: i for i, bound in enumerate(self.bounds)}

    def segments(self, start: int, end: int) -> list[tuple[int, int]]:
        """The segments [a, b) that make up [start, end)."""
        index = self._index
        if start not in index or end not in index:
            raise ValueError(f"tile [{start}, {end}) does not start and end on the bounds {self.bounds}")
        return list(zip(self.bounds[index[start]:index[end]], self.bounds[index[start] + 1:index[end] + 1]))


@dataclass(frozen=True)
class ElasticSlices:
    """Which part of an elastic linear's weight each level runs.  Along `axis` (rows: out features,
    gate/up and q; columns: in features, down and o_proj), a level of width w keeps [s, s + w) of
    every elastic part starting at s in `part_starts` (gate and up: two parts), and the `fixed`
    range whole (a fused QKV's K and V rows).  The widths are non-increasing by level index, the
    first the whole part, so level 0 keeps the whole weight in its stored order."""

    axis: str  # "rows" or "columns"
    part_starts: tuple[int, ...]
    widths: tuple[int, ...]  # per level index
    fixed: tuple[int, int] | None = None  # [start, end) every level keeps

    def index(self, width: int) -> torch.Tensor:
        """[kept] int64: the rows or columns a level of this width keeps, in stored order."""
        ranges = [torch.arange(start, start + width) for start in self.part_starts]
        if self.fixed is not None:
            ranges.append(torch.arange(*self.fixed))
        return torch.cat(ranges)

    @property
    def tile_bounds(self) -> TileBounds:
        """The bounds column tiles (engine/model/layers/elastic.py) cut this weight at."""
        bounds = {start + width for start in self.part_starts for width in (0, *self.widths)}
        return TileBounds(self.axis, tuple(sorted(bounds | set(self.fixed or ()))))


@dataclass(frozen=True)
class SliceExtension:
    """What every level slice of an elastic linear appends (engine/model/layers/elastic.py,
    FoldedSidePaths): along axis rows, `weight` [extra, in] as output rows after the slice's;
    along axis columns, `weight` [out, extra] as input columns after the slice's.  So the levels'
    recovery side paths ride in the block's own GEMMs instead of calls of their own."""

    weight: torch.Tensor

    def size(self, axis: str) -> int:
        return self.weight.shape[0 if axis == "rows" else 1]


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, plan: ComputePlan,
                 elastic: ElasticSlices | None = None, extension: SliceExtension | None = None) -> None:
        """`elastic`: what each elastic level runs of this weight, as column tiles (forward_rows /
        forward_columns) or as one level's whole slice (forward_level); None for a plain linear.
        `extension`: what every level slice appends (forward_level only)."""
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.plan = plan
        self.elastic = elastic
        self.tile_bounds = None if elastic is None else elastic.tile_bounds
        self.extension = extension
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self.dense: torch.Tensor | None = None
        self.packed: torch.Tensor | None = None
        self.packed_levels: dict[int, torch.Tensor] | None = None  # width -> its slice + extension, prepacked
        self.quantized: QuantizedWeight | None = None
        # The inputs' gather into the blocks' stored column order (InputPermutedBlocks), or None.
        self.quantized_input_order: torch.Tensor | None = None

    def _with_panels(self, weight: QuantizedWeight) -> QuantizedWeight:
        """Blocks that run with Q8 activations get their panels packed once, here, rather than by
        every call (quantized_linear_q8.cpp, "Packed panels"): ~20% of a 32-row decode step."""
        return pack_panels(weight) if self.plan.q8_above_rows is not None else weight

    def load(self, weight: LinearWeight) -> None:
        """Store the weight in the plan's format (see the module docstring); called once.  With
        plan.dense_above_rows, quantized weights also keep a dense copy for large batches."""
        expected = (self.out_features, self.in_features)
        if weight_shape(weight) != expected:
            raise ValueError(f"weight of shape {weight_shape(weight)} for a {expected} linear")
        weight = in_plan_format(weight, self.plan)
        if isinstance(weight, InputPermutedBlocks):
            self.quantized, self.quantized_input_order = self._with_panels(weight.blocks), weight.stored_order
            if self.plan.dense_above_rows is None:
                return
            weight = weight.dequantize().to(self.plan.dtype)
        elif isinstance(weight, QuantizedWeight):
            self.quantized = self._with_panels(weight)
            if self.plan.dense_above_rows is None:
                return
            weight = dequantize(weight).to(self.plan.dtype)
        if self.plan.prepack_bf16 and weight.dtype == torch.bfloat16:
            if self.elastic is None:
                self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
                return
            # No plain whole weight: steps past dense_above_rows run level slices, the full
            # level's included (runs_level_slices), so the extension costs no second copy.
            self.packed_levels = _pack_levels(weight, self.elastic, self.extension)
            return
        self.dense = weight

    def forward(self, x: torch.Tensor, batch: ForwardBatch | None = None) -> torch.Tensor:
        """x [rows, in] -> [rows, out].  `batch` is the step's ForwardBatch (None for rows that are
        not one, the LM head's): where a per-row setting (an elastic width) is added, it is read
        from there."""
        # PERF: the quantized kernel reads a quarter of bf16's bytes, which wins while a step is
        # memory-bound (a few rows); past dense_above_rows the dense GEMM's bf16 dot products (or
        # MKL's fp32 tiles) win, 2-2.5x at 32 rows (benchmarks/quantized_linear.py).
        if self.runs_blocks(x.shape[0]):
            return self._quantized_kernel(x.shape[0])(self._in_stored_order(x), self.quantized, self.bias)
        if self.packed is not None:
            return _packed_linear(x, self.packed, self.bias)
        if self.packed_levels is not None:
            return self._forward_full_level(x)
        return F.linear(x, self.dense, self.bias)

    def runs_blocks(self, num_rows: int) -> bool:
        """Whether `forward` runs the quantized blocks (not a dense or prepacked form) at this many rows."""
        return self.quantized is not None and (self.plan.dense_above_rows is None
                                               or num_rows <= self.plan.dense_above_rows)

    def _forward_full_level(self, x: torch.Tensor) -> torch.Tensor:
        """An elastic linear with only level slices, every row at the full level: the full slice,
        its extension idle (axis rows: outputs past out_features dropped, a strided view; axis
        columns: zeros in the extension's inputs).  Plain steps of this many rows come here only
        while the block's other linear runs quantized blocks (a few rows, llama.elastic_path)."""
        full = self.elastic.widths[0]
        if self.extension is None:
            return self.forward_level(x, full)
        if self.elastic.axis == "rows":
            return self.forward_level(x, full)[:, :self.out_features]
        padding = x.new_zeros(x.shape[0], self.extension.size("columns"))
        return self.forward_level(torch.cat([x, padding], dim=1), full)

    # Elastic levels run in one of two ways (engine/model/layers/elastic.py), chosen by
    # runs_level_slices:
    #   - column tiles: a row or column range of the weight, which dense and quantized weights
    #     give as a view, never a copy; each weight column is read once a step whatever the mix;
    #   - level slices: a prepacked weight has no views, so it keeps each level width's whole
    #     slice prepacked (packed_levels, made once at load: on SmolLM2 weights resident 808 MB
    #     against 498 MB), and a step runs all its rows through the widest level's, one call.
    # PERF (2-vCPU Sapphire Rapids, bf16, two threads, quiet): a oneDNN call costs ~15-20 us hot
    # whatever its size (gate/up at 32 rows: 85 us whole, 37 us at 640 neurons, 26 us at 384) and
    # 60-80 us inside a decode step, its weights out of cache.  Tiles from segments prepacked one
    # by one cost a call per segment plus the copies that gather them (a uniform level-40 batch of
    # 32 ran 0.92x the full model's decode; now 1.2x), and one call per level present cost a mixed
    # step 2.4-2.9x its uniform steps' mean (now 1.2x).

    def runs_level_slices(self, num_rows: int) -> bool:
        """Whether a step of this many rows runs each level's prepacked slice (forward_level)
        rather than column tiles."""
        return self.packed_levels is not None and not self._runs_quantized(num_rows)

    def forward_level(self, x: torch.Tensor, width: int, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [n, kept inputs (+ extension columns)] @ the slice of a level of this width -> [n, kept
        outputs (+ extension rows)], in ElasticSlices.index order (gate then up, Q then K and V),
        one oneDNN call; `bias` [out] is added (the linear's own bias too, where it has one)."""
        return _packed_linear(x, self.packed_levels[width], self._slice_bias(width, bias))

    def _slice_bias(self, width: int, extra: torch.Tensor | None) -> torch.Tensor | None:
        if self.bias is None:
            return extra
        own = self.bias
        if self.elastic.axis == "rows":  # the slice's own rows, zeros for the extension's
            size = 0 if self.extension is None else self.extension.size("rows")
            own = torch.cat([own.index_select(0, self.elastic.index(width)), own.new_zeros(size)])
        return own if extra is None else own + extra

    def forward_rows(self, x: torch.Tensor, start: int, end: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """x [n, in] @ W[start:end]^T (+ bias[start:end]) -> [n, end - start], into `out` if given
        (rows may be strided, as a column range of a wider buffer is)."""
        bias = None if self.bias is None else self.bias[start:end]
        if self._runs_quantized(x.shape[0]):
            return self._quantized_kernel(x.shape[0])(self._in_stored_order(x), self.quantized.rows(start, end),
                                                      bias, out)
        weight = self.dense[start:end]
        if out is None:
            return F.linear(x, weight, bias)
        if bias is None:
            return torch.mm(x, weight.T, out=out)
        return torch.addmm(bias, x, weight.T, out=out)

    def forward_columns(self, x: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """x [n, end - start] (inputs start .. end - 1) @ W[:, start:end]^T -> [n, out], no bias
        (the caller sums tiles and adds it once).  Blocks with permuted inputs have no column
        views: the tile's inputs go in place among zeros and the whole weight runs (a caller with
        several tiles runs them as one, reads_whole_columns)."""
        if self.reads_whole_columns(x.shape[0]):
            padded = x.new_zeros(x.shape[0], self.in_features)
            padded[:, start:end] = x
            return self._quantized_kernel(x.shape[0])(self._in_stored_order(padded), self.quantized)
        if self._runs_quantized(x.shape[0]):
            return self._quantized_kernel(x.shape[0])(x, self.quantized.columns(start, end))
        return F.linear(x, self.dense[:, start:end])

    def reads_whole_columns(self, num_rows: int) -> bool:
        """Whether a step of this many rows runs blocks whose inputs are permuted (no column tiles:
        forward_columns reads the whole weight)."""
        return self.quantized_input_order is not None and self._runs_quantized(num_rows)

    def _in_stored_order(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantized_input_order is None:
            return x
        if x.shape[0] == 1:
            return x.index_select(1, self.quantized_input_order)
        # PERF: index_select along columns walks them one by one: 190 us for 64 x 1536 bf16, gather
        # 36 us (a decode step of 64 sequences ran 6.6 ms of these over 30 layers).
        return torch.gather(x, 1, self.quantized_input_order.expand(x.shape[0], -1))

    def _quantized_kernel(self, num_rows: int):
        return quantized_linear_q8 if self.plan.runs_q8(num_rows) else quantized_linear

    def _runs_quantized(self, num_rows: int) -> bool:
        """An elastic step runs quantized unless it is past dense_above_rows and a dense form
        (dense views or packed level slices) is there."""
        has_dense_form = self.dense is not None or self.packed_levels is not None
        return self.quantized is not None and (not has_dense_form or self.plan.dense_above_rows is None
                                               or num_rows <= self.plan.dense_above_rows)

    def extra_repr(self) -> str:
        forms = [f"quantized {self.quantized.format.name}"] if self.quantized is not None else []
        forms += ["prepacked"] if self.packed is not None else ["dense"] if self.dense is not None else []
        forms += [f"{len(self.packed_levels)} prepacked level slices"] if self.packed_levels else []
        form = " + ".join(forms)
        return f"in_features={self.in_features}, out_features={self.out_features}, {form}"

    __call__ = forward  # PERF: skips nn.Module.__call__, see engine/model/layers/__init__.py


class VocabEmbedding(nn.Module):
    """Token id -> embedding row.  Quantized tables stay quantized: only the rows looked up are
    dequantized (the tied LM head then reads the same blocks)."""

    def __init__(self, vocab_size: int, hidden_size: int, plan: ComputePlan, vocab_start: int = 0,
                 tp: TensorParallelGroup | None = None) -> None:
        """`vocab_start`, `tp`: vocabulary-parallel: this rank holds ids [vocab_start, vocab_start +
        vocab_size); others look up as zeros, and the all-reduce sums the one real row in."""
        super().__init__()
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.plan = plan
        self.vocab_start, self.tp = vocab_start, tp
        self.table: LinearWeight | None = None

    def _with_panels(self, weight: QuantizedWeight) -> QuantizedWeight:
        """Blocks that run with Q8 activations get their panels packed once, here, rather than by
        every call (quantized_linear_q8.cpp, "Packed panels"): ~20% of a 32-row decode step."""
        return pack_panels(weight) if self.plan.q8_above_rows is not None else weight

    def load(self, weight: LinearWeight) -> None:
        if weight_shape(weight) != (self.vocab_size, self.hidden_size):
            expected = (self.vocab_size, self.hidden_size)
            raise ValueError(f"embedding of shape {weight_shape(weight)}, expected {expected}")
        self.table = in_plan_format(weight, self.plan)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp is None:
            return self._lookup(input_ids)
        local_ids = input_ids - self.vocab_start
        elsewhere = (local_ids < 0) | (local_ids >= self.vocab_size)
        rows = self._lookup(local_ids.masked_fill(elsewhere, 0))
        rows.masked_fill_(elsewhere[:, None], 0)
        return self.tp.all_reduce_(rows)

    def _lookup(self, input_ids: torch.Tensor) -> torch.Tensor:
        table = self.table
        if isinstance(table, QuantizedWeight):
            return dequantize(QuantizedWeight(table.blocks[input_ids], table.format)).to(self.plan.dtype)
        return F.embedding(input_ids, table)

    __call__ = forward  # PERF: skips nn.Module.__call__, see engine/model/layers/__init__.py


# PERF: oneDNN compiles a kernel (a primitive) for every new (rows, weight shape) a prepacked weight
# meets: ~3 ms on a 2-vCPU Xeon with AMX, where the call itself takes ~1 ms at 300 rows.  It keeps
# them in a cache of ONEDNN_PRIMITIVE_CACHE_CAPACITY entries (engine/process_env.py).  A step's rows
# vary step to step in chunked prefill (chunks fitted to a TPOT bound, decodes joining and leaving,
# a pruned prompt's kept rows), and an elastic model has a weight shape per layer width (63 for
# SmolLM2), so the cache kept missing.  In #15's 1.5x run (auto, one process), 939 of 16,716 calls
# compiled, 5.8 s of the 14.6 s in these calls; one step of 5 rows beside a pruned document took
# 888 ms, 710 of them here.  Rows are padded up to a bucket (packed_rows_bucket), so shapes repeat:
# documents prefilled in chunks of 37-304 tokens beside 4 decodes ran 1.32x faster in a fresh
# process and 1.78x once warm (benchmarks/prepacked_rows.py).
PACKED_BUCKETS_PER_OCTAVE = 16
PACKED_EXACT_ROWS = 16  # up to here every row count is its own bucket (decode steps: padding would be most of the work)


def packed_rows_bucket(rows: int) -> int:
    """The row count a prepacked linear runs `rows` rows at: `rows` itself up to PACKED_EXACT_ROWS,
    else rounded up to a multiple of 1/PACKED_BUCKETS_PER_OCTAVE of its power of two (never less
    than PACKED_EXACT_ROWS): at most PACKED_BUCKETS_PER_OCTAVE shapes for the rows of an octave
    (2^k, 2^(k+1)], under 1/16 more rows from 256 rows, at most 15 more below."""
    if rows <= PACKED_EXACT_ROWS:
        return rows
    granule = max(PACKED_EXACT_ROWS, (1 << (rows.bit_length() - 1)) // PACKED_BUCKETS_PER_OCTAVE)
    return -(-rows // granule) * granule


def _packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [rows, in] @ a prepacked weight, run at packed_rows_bucket(rows) rows (the padding rows
    are zeros; each output row depends on its own input row only)."""
    rows = x.shape[0]
    bucket = packed_rows_bucket(rows)
    if bucket == rows:
        return _onednn_linear(x, packed, bias)
    padded = x.new_empty((bucket, x.shape[1]))
    padded[:rows] = x
    padded[rows:] = 0
    return _onednn_linear(padded, packed, bias)[:rows]


def _onednn_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def _pack_levels(weight: torch.Tensor, elastic: ElasticSlices, extension: SliceExtension | None
                 ) -> dict[int, torch.Tensor]:
    """Width -> the slice a level of that width runs, the extension appended, prepacked."""
    axis = 0 if elastic.axis == "rows" else 1

    def pack(width: int) -> torch.Tensor:
        sliced = weight.index_select(axis, elastic.index(width))
        if extension is not None:
            sliced = torch.cat([sliced, extension.weight.to(weight.dtype)], dim=axis)
        return torch.ops.mkldnn._reorder_linear_weight(sliced.contiguous(), None)

    return {width: pack(width) for width in dict.fromkeys(elastic.widths)}


def in_plan_format(weight: LinearWeight, plan: ComputePlan) -> LinearWeight:
    """native keeps a file's blocks (floats stay dense); int8 keeps Q8_0 blocks and quantizes the
    rest; dequantized turns blocks into floats.  Dense weights end up in the plan's dtype."""
    if isinstance(weight, InputPermutedBlocks):
        if plan.q8_above_rows is not None:
            # A plan that rounds activations to Q8 has left the file's exact arithmetic already:
            # its permuted inputs become Q8_0 blocks in their permuted order, so that a level's
            # columns are a prefix of whole blocks (a view) instead of a gather and the whole
            # weight.  Q8_0 holds a Q4_1 value to within 1/254 of its block's largest.
            return quantize(weight.dequantize(), QuantFormat.Q8_0)
        if plan.keeps_file_blocks or (plan.weight_format == "int8" and weight.blocks.format == QuantFormat.Q8_0):
            return weight
        weight = weight.dequantize()
    if isinstance(weight, QuantizedWeight):
        if plan.keeps_file_blocks or (plan.weight_format == "int8" and weight.format == QuantFormat.Q8_0):
            return weight
        weight = dequantize(weight)
    if plan.weight_format == "int8" and weight.shape[1] % BLOCK_SIZE == 0:
        return quantize(weight, QuantFormat.Q8_0)
    return weight.to(device=plan.device, dtype=plan.dtype)


def weight_shape(weight: LinearWeight) -> tuple[int, int]:
    if isinstance(weight, QuantizedWeight | InputPermutedBlocks):
        return weight.out_features, weight.in_features
    return tuple(weight.shape)


def weight_bytes(module: nn.Module) -> int:
    """Bytes the module's weights hold, each storage counted once (a tied table is one)."""
    storages: dict[int, int] = {}
    for tensor in [*module.parameters(), *module.buffers(), *_layer_weights(module)]:
        # Prepacked oneDNN weights are opaque (no data pointer): count them by identity.
        key = tensor.data_ptr() if tensor.layout == torch.strided else id(tensor)
        storages[key] = tensor.numel() * tensor.element_size()
    return sum(storages.values())


def _layer_weights(module: nn.Module) -> list[torch.Tensor]:
    tensors = []
    for layer in module.modules():
        if isinstance(layer, Linear):
            tensors += [t for t in (layer.dense, layer.packed) if t is not None]
            tensors += list((layer.packed_levels or {}).values())
            if layer.quantized is not None:
                tensors.append(layer.quantized.blocks)
                if layer.quantized.panels is not None:
                    tensors.append(layer.quantized.panels.packed)
        elif isinstance(layer, VocabEmbedding) and layer.table is not None:
            table = layer.table
            tensors.append(table.blocks if isinstance(table, QuantizedWeight) else table)
    return tensors
