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

import torch
import torch.nn.functional as F
from torch import nn

from engine.kernels.cpu.quantized_linear import quantized_linear
from engine.kernels.cpu.quantized_linear_q8 import quantized_linear_q8
from engine.kernels.cpu.quantized_weights import BLOCK_SIZE, QuantFormat, QuantizedWeight, dequantize, quantize
from engine.model.compute_plan import ComputePlan
from engine.model.forward_batch import ForwardBatch

LinearWeight = torch.Tensor | QuantizedWeight


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, plan: ComputePlan) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.plan = plan
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self.dense: torch.Tensor | None = None
        self.packed: torch.Tensor | None = None
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
        else:
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
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.dense, self.bias)

    # Elastic tiles (engine/model/layers/elastic.py): a row or column range of the weight, as a
    # view, never a copy.  Elastic models are not prepacked (a packed weight has no views).

    def forward_rows(self, x: torch.Tensor, start: int, end: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """x [n, in] @ W[start:end]^T (+ bias[start:end]) -> [n, end - start], into `out` if given
        (rows may be strided, as a column range of a wider buffer is)."""
        bias = None if self.bias is None else self.bias[start:end]
        if self._runs_quantized(x.shape[0]):
            return self._quantized_kernel(x.shape[0])(x, self.quantized.rows(start, end), bias, out)
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
        return F.linear(x, self.dense[:, start:end])

    def _quantized_kernel(self, num_rows: int):
        return quantized_linear_q8 if self.plan.runs_q8(num_rows) else quantized_linear

    def _runs_quantized(self, num_rows: int) -> bool:
        return self.quantized is not None and (self.dense is None or self.plan.dense_above_rows is None
                                               or num_rows <= self.plan.dense_above_rows)

    def extra_repr(self) -> str:
        forms = [f"quantized {self.quantized.format.name}"] if self.quantized is not None else []
        forms += ["prepacked"] if self.packed is not None else ["dense"] if self.dense is not None else []
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
            raise ValueError(f"embedding of shape {weight_shape(weight)}, expected {(self.vocab_size, self.hidden_size)}")
        self.table = in_plan_format(weight, self.plan)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        table = self.table
        if isinstance(table, QuantizedWeight):
            return dequantize(QuantizedWeight(table.blocks[input_ids], table.format)).to(self.plan.dtype)
        return F.embedding(input_ids, table)

    __call__ = forward  # PERF: skips nn.Module.__call__, see engine/model/layers/__init__.py


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
            if layer.quantized is not None:
                tensors.append(layer.quantized.blocks)
        elif isinstance(layer, VocabEmbedding) and layer.table is not None:
            table = layer.table
            tensors.append(table.blocks if isinstance(table, QuantizedWeight) else table)
    return tensors
