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

from engine.kernels.cpu.quantized_linear import quantized_linear
from engine.kernels.cpu.quantized_linear_q8 import quantized_linear_q8
from engine.kernels.cpu.quantized_weights import BLOCK_SIZE, QuantFormat, QuantizedWeight, dequantize, quantize
from engine.model.compute_plan import ComputePlan
from engine.model.forward_batch import ForwardBatch

LinearWeight = torch.Tensor | QuantizedWeight


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


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, plan: ComputePlan,
                 tile_bounds: TileBounds | None = None) -> None:
        """`tile_bounds`: elastic levels run row or column ranges of the weight (forward_rows /
        forward_columns) that start and end on these bounds; None for a plain linear."""
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.plan = plan
        self.tile_bounds = tile_bounds
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self.dense: torch.Tensor | None = None
        self.packed: torch.Tensor | None = None
        self.packed_segments: dict[tuple[int, int], torch.Tensor] | None = None
        self.quantized: QuantizedWeight | None = None

    def load(self, weight: LinearWeight) -> None:
        """Store the weight in the plan's format (see the module docstring); called once.  With
        plan.dense_above_rows, quantized weights also keep a dense copy for large batches."""
        expected = (self.out_features, self.in_features)
        if weight_shape(weight) != expected:
            raise ValueError(f"weight of shape {weight_shape(weight)} for a {expected} linear")
        weight = in_plan_format(weight, self.plan)
        if isinstance(weight, QuantizedWeight):
            self.quantized = weight
            if self.plan.dense_above_rows is None:
                return
            weight = dequantize(weight).to(self.plan.dtype)
        if self.plan.prepack_bf16 and weight.dtype == torch.bfloat16:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
            if self.tile_bounds is not None:
                self.packed_segments = _pack_segments(weight, self.tile_bounds)
            return
        self.dense = weight

    def forward(self, x: torch.Tensor, batch: ForwardBatch | None = None) -> torch.Tensor:
        """x [rows, in] -> [rows, out].  `batch` is the step's ForwardBatch (None for rows that are
        not one, the LM head's): where a per-row setting (an elastic width) is added, it is read
        from there."""
        # PERF: the quantized kernel reads a quarter of bf16's bytes, which wins while a step is
        # memory-bound (a few rows); past dense_above_rows the dense GEMM's bf16 dot products (or
        # MKL's fp32 tiles) win, 2-2.5x at 32 rows (benchmarks/quantized_linear.py).
        if self.quantized is not None and (self.plan.dense_above_rows is None
                                           or x.shape[0] <= self.plan.dense_above_rows):
            return self._quantized_kernel(x.shape[0])(x, self.quantized, self.bias)
        if self.packed is not None:
            return _packed_linear(x, self.packed, self.bias)
        return F.linear(x, self.dense, self.bias)

    # Elastic tiles (engine/model/layers/elastic.py): a row or column range of the weight.  Dense
    # and quantized weights give it as a view, never a copy.  A prepacked weight has no views, so
    # a tiled linear also keeps each segment between its tile bounds prepacked on its own (the
    # segments partition the weight: one more copy of it, made once at load); steps whose rows
    # all run the whole weight take the whole packed one (forward).
    # PERF (2-vCPU Sapphire Rapids, bf16, one thread): gate + up + down at a 576-neuron prefix,
    # 16 rows: 204 us from packed segments against 321 us from dense views, which oneDNN re-lays
    # out on every call (the whole layer prepacked: 438 us).  A tile made of many thin segments
    # pays ~25 us a GEMM call: 12 segments of the whole gate/up took 597 us against 296 us whole.

    def forward_rows(self, x: torch.Tensor, start: int, end: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """x [n, in] @ W[start:end]^T (+ bias[start:end]) -> [n, end - start], into `out` if given
        (rows may be strided, as a column range of a wider buffer is)."""
        bias = None if self.bias is None else self.bias[start:end]
        if self._runs_quantized(x.shape[0]):
            return self._quantized_kernel(x.shape[0])(x, self.quantized.rows(start, end), bias, out)
        if self.packed_segments is not None:
            return self._packed_rows(x, start, end, out)
        weight = self.dense[start:end]
        if out is None:
            return F.linear(x, weight, bias)
        if bias is None:
            return torch.mm(x, weight.T, out=out)
        return torch.addmm(bias, x, weight.T, out=out)

    def forward_columns(self, x: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """x [n, end - start] (inputs start .. end - 1) @ W[:, start:end]^T -> [n, out], no bias
        (the caller sums tiles and adds it once)."""
        if self._runs_quantized(x.shape[0]):
            return self._quantized_kernel(x.shape[0])(x, self.quantized.columns(start, end))
        if self.packed_segments is not None:
            total = None
            for a, b in self.tile_bounds.segments(start, end):
                part = _packed_linear(x[:, a - start:b - start].contiguous(), self.packed_segments[a, b], None)
                total = part if total is None else total.add_(part)
            return total
        return F.linear(x, self.dense[:, start:end])

    def _packed_rows(self, x: torch.Tensor, start: int, end: int, out: torch.Tensor | None) -> torch.Tensor:
        if out is None:
            out = x.new_empty(x.shape[0], end - start)
        for a, b in self.tile_bounds.segments(start, end):
            bias = None if self.bias is None else self.bias[a:b]
            out[:, a - start:b - start] = _packed_linear(x, self.packed_segments[a, b], bias)
        return out

    def _quantized_kernel(self, num_rows: int):
        return quantized_linear_q8 if self.plan.runs_q8(num_rows) else quantized_linear

    def _runs_quantized(self, num_rows: int) -> bool:
        """A tile runs quantized unless this step is past dense_above_rows and a dense form
        (dense views or packed segments) is there."""
        has_dense_tiles = self.dense is not None or self.packed_segments is not None
        return self.quantized is not None and (not has_dense_tiles or self.plan.dense_above_rows is None
                                               or num_rows <= self.plan.dense_above_rows)

    def extra_repr(self) -> str:
        forms = [f"quantized {self.quantized.format.name}"] if self.quantized is not None else []
        forms += ["prepacked"] if self.packed is not None else ["dense"] if self.dense is not None else []
        forms += [f"{len(self.packed_segments)} prepacked segments"] if self.packed_segments else []
        form = " + ".join(forms)
        return f"in_features={self.in_features}, out_features={self.out_features}, {form}"

    __call__ = forward  # PERF: skips nn.Module.__call__, see engine/model/layers/__init__.py


class VocabEmbedding(nn.Module):
    """Token id -> embedding row.  Quantized tables stay quantized: only the rows looked up are
    dequantized (the tied LM head then reads the same blocks)."""

    def __init__(self, vocab_size: int, hidden_size: int, plan: ComputePlan) -> None:
        super().__init__()
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.plan = plan
        self.table: LinearWeight | None = None

    def load(self, weight: LinearWeight) -> None:
        if weight_shape(weight) != (self.vocab_size, self.hidden_size):
            expected = (self.vocab_size, self.hidden_size)
            raise ValueError(f"embedding of shape {weight_shape(weight)}, expected {expected}")
        self.table = in_plan_format(weight, self.plan)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        table = self.table
        if isinstance(table, QuantizedWeight):
            return dequantize(QuantizedWeight(table.blocks[input_ids], table.format)).to(self.plan.dtype)
        return F.embedding(input_ids, table)

    __call__ = forward  # PERF: skips nn.Module.__call__, see engine/model/layers/__init__.py


def _packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def _pack_segments(weight: torch.Tensor, bounds: TileBounds) -> dict[tuple[int, int], torch.Tensor]:
    def segment(a: int, b: int) -> torch.Tensor:
        return (weight[a:b] if bounds.axis == "rows" else weight[:, a:b]).contiguous()

    return {(a, b): torch.ops.mkldnn._reorder_linear_weight(segment(a, b), None)
            for a, b in zip(bounds.bounds, bounds.bounds[1:])}


def in_plan_format(weight: LinearWeight, plan: ComputePlan) -> LinearWeight:
    """native keeps a file's blocks (floats stay dense); int8 keeps Q8_0 blocks and quantizes the
    rest; dequantized turns blocks into floats.  Dense weights end up in the plan's dtype."""
    if isinstance(weight, QuantizedWeight):
        if plan.keeps_file_blocks or (plan.weight_format == "int8" and weight.format == QuantFormat.Q8_0):
            return weight
        weight = dequantize(weight)
    if plan.weight_format == "int8" and weight.shape[1] % BLOCK_SIZE == 0:
        return quantize(weight, QuantFormat.Q8_0)
    return weight.to(device=plan.device, dtype=plan.dtype)


def weight_shape(weight: LinearWeight) -> tuple[int, int]:
    if isinstance(weight, QuantizedWeight):
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
            tensors += list((layer.packed_segments or {}).values())
            if layer.quantized is not None:
                tensors.append(layer.quantized.blocks)
        elif isinstance(layer, VocabEmbedding) and layer.table is not None:
            table = layer.table
            tensors.append(table.blocks if isinstance(table, QuantizedWeight) else table)
    return tensors
