"""Weights kept as GGUF quantization blocks: the `QuantizedWeight` that quantized_linear.cpp reads,
its builders (from a GGUF tensor, from a float weight) and its reference dequantization.

Block layouts (32 weights along in_features, fp16 scales; quantized_linear.cpp has the table):
Q4_0 18 bytes (d, 16 bytes of nibbles), Q4_1 20 bytes (d, m, nibbles), Q8_0 34 bytes (d, 32 int8).
The int8 format for float checkpoints is Q8_0, quantized by gguf's own code (`quantize`): one
kernel, and the same blocks llama.cpp would write.

A QuantizedWeight's rows are output features, each row its blocks along in_features, exactly the
uint8 array [out_features, in_features / 32 * block_bytes] that GGUFReader gives.  `prefix(n, k)`
is a view of the first n rows and first k input features, sharing the memory: an elastic
submodel runs a prefix of each matrix, so rows may lie `row_stride` bytes apart, more than a row.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import quantize as gguf_quantize

BLOCK_SIZE = 32  # weights per block, in every format


class QuantFormat(enum.Enum):
    """A block format; the value is quantized_linear.cpp's format code."""

    Q4_0 = 0
    Q4_1 = 1
    Q8_0 = 2

    @property
    def block_bytes(self) -> int:
        return _BLOCK_BYTES[self]

    @property
    def ggml_type(self) -> GGMLQuantizationType:
        return GGMLQuantizationType[self.name]

    @classmethod
    def from_ggml(cls, ggml_type: GGMLQuantizationType) -> QuantFormat:
        if ggml_type.name not in cls.__members__:
            raise ValueError(f"GGUF type {ggml_type.name} has no quantized kernel; supported: "
                             f"{', '.join(cls.__members__)}")
        return cls[ggml_type.name]


_BLOCK_BYTES = {QuantFormat.Q4_0: 18, QuantFormat.Q4_1: 20, QuantFormat.Q8_0: 34}


@dataclass(frozen=True, slots=True)
class PackedPanels:
    """A weight's blocks packed once, at load, into the panels the Q8-activation kernel would
    otherwise pack on every call (quantized_linear_q8.cpp, "Packed panels"; quantized_linear_q8.py
    packs them).  The layout has the vector width of the build that packed it (`isa`): another
    build ignores them.  A view of the weight starts at packed row `row0` and block `block0` of
    the `k_blocks` a packed row has."""

    packed: torch.Tensor  # uint8, the whole weight's panels
    isa: str
    k_blocks: int
    row0: int = 0
    block0: int = 0


@dataclass(frozen=True, slots=True)
class QuantizedWeight:
    """A [out_features, in_features] weight as its blocks: `blocks` uint8 [out_features,
    in_features / 32 * block_bytes] on the CPU, bytes within a row contiguous, rows `row_stride`
    bytes apart (a prefix view keeps its parent's stride).  The sizes are derived from `blocks`
    once, here: the kernel's wrapper reads them on every call."""

    blocks: torch.Tensor
    format: QuantFormat
    panels: PackedPanels | None = None  # the same weight packed for the Q8 kernel, or None
    out_features: int = field(init=False)
    in_features: int = field(init=False)
    row_stride: int = field(init=False)  # bytes from one output row's blocks to the next

    def __post_init__(self) -> None:
        blocks, block_bytes = self.blocks, self.format.block_bytes
        if blocks.dtype != torch.uint8 or blocks.dim() != 2 or not blocks.is_cpu:
            raise ValueError(f"blocks must be a 2-D uint8 CPU tensor, got {blocks.dtype} {tuple(blocks.shape)} "
                             f"on {blocks.device}")
        if blocks.shape[1] % block_bytes:
            raise ValueError(f"a {self.format.name} row is whole {block_bytes}-byte blocks, got "
                             f"{blocks.shape[1]} bytes")
        if blocks.stride(1) != 1 and blocks.shape[1] > 1:
            raise ValueError(f"the bytes of a row must be contiguous, got strides {blocks.stride()}")
        object.__setattr__(self, "out_features", blocks.shape[0])
        object.__setattr__(self, "in_features", blocks.shape[1] // block_bytes * BLOCK_SIZE)
        object.__setattr__(self, "row_stride", blocks.stride(0))

    def prefix(self, out_features: int, in_features: int | None = None) -> QuantizedWeight:
        """The first out_features rows and first in_features inputs (a multiple of 32), no copy."""
        in_features = self.in_features if in_features is None else in_features
        if not 0 <= out_features <= self.out_features or not 0 <= in_features <= self.in_features:
            raise ValueError(f"prefix ({out_features}, {in_features}) is outside the weight's "
                             f"({self.out_features}, {self.in_features})")
        if in_features % BLOCK_SIZE:
            raise ValueError(f"in_features of a prefix must be a multiple of {BLOCK_SIZE}, got {in_features}")
        row_bytes = in_features // BLOCK_SIZE * self.format.block_bytes
        return QuantizedWeight(self.blocks[:out_features, :row_bytes], self.format, self.panels)


    def rows(self, start: int, end: int) -> QuantizedWeight:
        """Output features [start, end), no copy (an elastic tile of a prefix-ordered weight)."""
        if not 0 <= start <= end <= self.out_features:
            raise ValueError(f"rows [{start}, {end}) are outside the weight's {self.out_features}")
        return QuantizedWeight(self.blocks[start:end], self.format, self._panels_from(start, 0))

    def columns(self, start: int, end: int) -> QuantizedWeight:
        """Input features [start, end) (multiples of 32: whole blocks), no copy."""
        if not 0 <= start <= end <= self.in_features or start % BLOCK_SIZE or end % BLOCK_SIZE:
            raise ValueError(f"columns [{start}, {end}) must be whole {BLOCK_SIZE}-wide blocks within "
                             f"{self.in_features}")
        block_bytes = self.format.block_bytes
        return QuantizedWeight(self.blocks[:, start // BLOCK_SIZE * block_bytes: end // BLOCK_SIZE * block_bytes],
                               self.format, self._panels_from(0, start // BLOCK_SIZE))

    def _panels_from(self, row: int, block: int) -> PackedPanels | None:
        """The panels of a view starting `row` rows and `block` blocks into this one."""
        if self.panels is None:
            return None
        return replace(self.panels, row0=self.panels.row0 + row, block0=self.panels.block0 + block)


def from_gguf_tensor(tensor) -> QuantizedWeight:
    """A GGUFReader tensor (gguf.ReaderTensor) of type Q4_0, Q4_1 or Q8_0, copied out of the file's
    read-only memory map into its own tensor."""
    weight = from_blocks(tensor.data, QuantFormat.from_ggml(tensor.tensor_type))
    in_features, out_features = (int(d) for d in tensor.shape)  # GGUF lists the fastest dimension first
    if (weight.out_features, weight.in_features) != (out_features, in_features):
        raise ValueError(f"tensor {tensor.name}: blocks {tuple(tensor.data.shape)} do not hold "
                         f"[{out_features}, {in_features}]")
    return weight


def from_blocks(blocks: np.ndarray | torch.Tensor, format: QuantFormat) -> QuantizedWeight:
    """A uint8 block array [out_features, row bytes] (copied when it is numpy)."""
    if isinstance(blocks, np.ndarray):
        if blocks.dtype != np.uint8 or blocks.ndim != 2:
            raise ValueError(f"blocks must be a 2-D uint8 array, got {blocks.dtype} {blocks.shape}")
        blocks = torch.from_numpy(np.array(blocks, copy=True, order="C"))
    return QuantizedWeight(blocks, format)


def quantize(weight: torch.Tensor, format: QuantFormat = QuantFormat.Q8_0) -> QuantizedWeight:
    """A float [out_features, in_features] weight (in_features a multiple of 32) in `format`, by
    gguf's reference quantizers (Q8_0: per block d = max|w| / 127, q = round(w / d))."""
    if weight.dim() != 2 or weight.shape[1] % BLOCK_SIZE or not weight.is_floating_point():
        raise ValueError(f"weight must be a float [out, in] with in a multiple of {BLOCK_SIZE}, got "
                         f"{weight.dtype} {tuple(weight.shape)}")
    array = weight.detach().to("cpu", torch.float32).contiguous().numpy()
    return QuantizedWeight(torch.from_numpy(gguf_quantize(array, format.ggml_type)), format)


def concat_rows(weights: Sequence[QuantizedWeight]) -> QuantizedWeight:
    """One weight of the rows of several (a fused QKV or gate/up projection), copied."""
    formats = {w.format for w in weights}
    in_features = {w.in_features for w in weights}
    if len(formats) != 1 or len(in_features) != 1:
        raise ValueError(f"weights to concatenate must share format and in_features, got {formats} {in_features}")
    return QuantizedWeight(torch.cat([w.blocks for w in weights]), formats.pop())


def dequantize(weight: QuantizedWeight) -> torch.Tensor:
    """The fp32 [out_features, in_features] weight: the reference the kernel matches, computed as
    gguf's dequantize does (d * q exact in fp32, then + m)."""
    num_blocks = weight.in_features // BLOCK_SIZE
    blocks = weight.blocks.reshape(weight.out_features, num_blocks, weight.format.block_bytes)
    d = blocks[..., 0:2].contiguous().view(torch.float16).float()
    if weight.format == QuantFormat.Q8_0:
        values = d * blocks[..., 2:].contiguous().view(torch.int8).float()
    else:
        nibbles = blocks[..., 2:] if weight.format == QuantFormat.Q4_0 else blocks[..., 4:]
        q = torch.cat([nibbles & 0xF, nibbles >> 4], dim=-1).float()  # weight j < 16 is the low nibble of byte j
        if weight.format == QuantFormat.Q4_0:
            values = d * (q - 8)
        else:
            values = d * q + blocks[..., 2:4].contiguous().view(torch.float16).float()
    return values.reshape(weight.out_features, weight.in_features)


@dataclass(frozen=True, slots=True)
class InputPermutedBlocks:
    """A weight whose input columns were permuted (an elastic model's down projection: neurons in
    importance order), kept as its file's blocks in their stored column order: logical column i is
    stored column `columns[i]`.  A block's 32 columns share one scale (and minimum), so no block
    format holds single moved columns exactly; instead of dequantizing (bf16: 3.2x Q4_1's bytes)
    or re-quantizing (another model), the layer gathers its input into stored order
    (`x[:, stored_order]`, stored_order = argsort(columns)) and runs the blocks as they are."""

    blocks: QuantizedWeight
    columns: torch.Tensor  # int64 [in_features], a permutation
    stored_order: torch.Tensor = field(init=False)  # int64 [in_features]: input i of stored order is x[stored_order[i]]

    def __post_init__(self) -> None:
        if sorted(self.columns.tolist()) != list(range(self.blocks.in_features)):
            raise ValueError(f"columns must be a permutation of the weight's {self.blocks.in_features} inputs")
        object.__setattr__(self, "stored_order", torch.argsort(self.columns))

    @property
    def out_features(self) -> int:
        return self.blocks.out_features

    @property
    def in_features(self) -> int:
        return self.blocks.in_features

    def dequantize(self) -> torch.Tensor:
        """The fp32 weight with its columns in logical (permuted) order."""
        return dequantize(self.blocks)[:, self.columns]
