"""A GGUF file's metadata and tensors, parsed in one pass over the header.

Why not `gguf.GGUFReader`: it builds a numpy memory-map view for every part of every field, ~1.5 M
of them for SmolLM2's 49k-token vocabulary and 49k merges, and each view runs numpy's memmap
bookkeeping: 4.4 s a parse on the 2-core dev machine, a quarter of a server's start-up.  This
reader walks the same header with `struct` over the mapped bytes (~0.1 s) and keeps only the
values.  It exposes what the engine reads, with GGUFReader's meaning: `fields[key].contents()`
(a str, number, or list; nested arrays flattened, as GGUFReader does) and `tensors` (name, ggml
type, GGUF dims, element and byte counts, file offset, and `data`: a read-only view of the mapped
file shaped as GGUFReader shapes it).  The format's types, block sizes and byte shapes still come
from the `gguf` package; tests/model/test_gguf_file.py holds both readers to the same fields and
tensors on the real model file and on files gguf's writer makes.

GGUF (v2, v3), little- or big-endian:
    magic "GGUF" | version u32 | tensor_count u64 | kv_count u64
    kv_count x (key: string, value_type u32, value)
    tensor_count x (name: string, n_dims u32, dims u64 x n_dims, ggml_type u32, offset u64)
    padding to general.alignment (default 32) | tensor data, each at data_start + its offset
    string = length u64 + utf-8 bytes; array = item_type u32 + count u64 + items
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GGMLQuantizationType, GGUFValueType
from gguf.quants import quant_shape_to_byte_shape

from engine.config import ModelFileError

SUPPORTED_VERSIONS = (2, 3)
# Fixed-size value types and their numpy dtypes (in the file's byte order when read)
_SCALARS = {
    GGUFValueType.UINT8: np.uint8, GGUFValueType.INT8: np.int8, GGUFValueType.UINT16: np.uint16,
    GGUFValueType.INT16: np.int16, GGUFValueType.UINT32: np.uint32, GGUFValueType.INT32: np.int32,
    GGUFValueType.FLOAT32: np.float32, GGUFValueType.UINT64: np.uint64, GGUFValueType.INT64: np.int64,
    GGUFValueType.FLOAT64: np.float64, GGUFValueType.BOOL: np.bool_,
}
# Tensor types stored as plain elements (others are quantized blocks, viewed as bytes)
_ELEMENT_TYPES = {
    GGMLQuantizationType.F16: np.float16, GGMLQuantizationType.F32: np.float32,
    GGMLQuantizationType.F64: np.float64, GGMLQuantizationType.I8: np.int8,
    GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32, GGMLQuantizationType.I64: np.int64,
}


@dataclass(frozen=True)
class GGUFField:
    name: str
    types: tuple[GGUFValueType, ...]  # the value's type, then an array's item type(s)
    value: Any  # a str, a Python number or bool, or a flat list of them

    def contents(self) -> Any:
        return self.value


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]  # GGUF's order: the fastest-varying dimension first
    n_elements: int
    n_bytes: int
    data_offset: int  # from the start of the file
    data: np.ndarray  # read-only view of the file: elements [reversed shape], or block bytes


class GGUFFile:
    """One GGUF file, mapped read-only.  Invariant: `data` arrays view the mapping, which lives
    as long as any of them (numpy holds it), so none is ever copied here."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        try:
            self._parse()
        except ModelFileError:
            raise
        except (ValueError, struct.error, UnicodeDecodeError) as error:  # cut short, or not GGUF at all
            raise ModelFileError(f"{path}: not a readable GGUF file ({error})") from None

    def _parse(self) -> None:
        path = self.path
        with open(path, "rb") as file:
            self._map = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)  # ValueError when empty
        self._offset = 0
        magic, = struct.unpack_from("<I", self._map, 0)
        if magic != GGUF_MAGIC:
            raise ModelFileError(f"{path}: not a GGUF file (bad magic)")
        version, = struct.unpack_from("<I", self._map, 4)
        # A file written on the other byte order reads as version << 16 (GGUFReader's test too).
        self._order = "<" if version & 0xFFFF else ">"
        self._offset = 4
        version = self._read("I")
        if version not in SUPPORTED_VERSIONS:
            raise ModelFileError(f"{path}: GGUF version {version} is not supported (only {list(SUPPORTED_VERSIONS)})")
        tensor_count, kv_count = self._read("Q"), self._read("Q")
        self.fields: dict[str, GGUFField] = {
            "GGUF.version": GGUFField("GGUF.version", (GGUFValueType.UINT32,), version),
            "GGUF.tensor_count": GGUFField("GGUF.tensor_count", (GGUFValueType.UINT64,), tensor_count),
            "GGUF.kv_count": GGUFField("GGUF.kv_count", (GGUFValueType.UINT64,), kv_count),
        }
        for _ in range(kv_count):
            key = self._read_str()
            if key in self.fields:
                raise ModelFileError(f"{path}: duplicate metadata key {key!r}")
            types, value = self._read_value(GGUFValueType(self._read("I")))
            self.fields[key] = GGUFField(key, types, value)
        infos = [self._read_tensor_info() for _ in range(tensor_count)]
        alignment = self._alignment()
        data_start = -(-self._offset // alignment) * alignment
        self.tensors = [self._tensor(*info, data_start) for info in infos]
        if len({t.name for t in self.tensors}) != len(self.tensors):
            raise ModelFileError(f"{path}: duplicate tensor names")

    # --- the header, in file order -------------------------------------------------------------

    def _read(self, code: str) -> Any:
        value, = struct.unpack_from(self._order + code, self._map, self._offset)
        self._offset += struct.calcsize(code)
        return value

    def _read_str(self) -> str:
        length = self._read("Q")
        start, self._offset = self._offset, self._offset + length
        return self._map[start:self._offset].decode("utf-8")

    def _read_scalars(self, value_type: GGUFValueType, count: int) -> list[Any]:
        """`count` values of a fixed-size type, as Python numbers or bools."""
        items = np.frombuffer(self._map, np.dtype(_SCALARS[value_type]).newbyteorder(self._order), count, self._offset)
        self._offset += items.nbytes
        return items.tolist()

    def _read_value(self, value_type: GGUFValueType) -> tuple[tuple[GGUFValueType, ...], Any]:
        if value_type == GGUFValueType.STRING:
            return (value_type,), self._read_str()
        if value_type in _SCALARS:
            return (value_type,), self._read_scalars(value_type, 1)[0]
        if value_type != GGUFValueType.ARRAY:
            raise ModelFileError(f"{self.path}: unknown metadata value type {value_type}")
        item_type, count = GGUFValueType(self._read("I")), self._read("Q")
        if item_type in _SCALARS:  # one numpy read for the whole array
            return (value_type, item_type), self._read_scalars(item_type, count)
        items, item_types = [], (item_type,)
        for _ in range(count):
            item_types, item = self._read_value(item_type)
            items += item if isinstance(item, list) else [item]  # nested arrays flatten, as in GGUFReader
        return (value_type, *item_types), items

    def _read_tensor_info(self) -> tuple[str, tuple[int, ...], GGMLQuantizationType, int]:
        name = self._read_str()
        dims = tuple(self._read("Q") for _ in range(self._read("I")))
        return name, dims, GGMLQuantizationType(self._read("I")), self._read("Q")

    def _alignment(self) -> int:
        field = self.fields.get("general.alignment")
        if field is None:
            return GGUF_DEFAULT_ALIGNMENT
        if field.types != (GGUFValueType.UINT32,) or field.value <= 0 or field.value & (field.value - 1):
            raise ModelFileError(f"{self.path}: general.alignment must be a power of two (uint32), got {field.value}")
        return field.value

    def _tensor(self, name: str, dims: tuple[int, ...], ggml_type: GGMLQuantizationType, offset: int,
                data_start: int) -> GGUFTensor:
        n_elements = int(np.prod(dims, dtype=np.int64))
        block_size, type_size = GGML_QUANT_SIZES[ggml_type]
        n_bytes = n_elements * type_size // block_size
        numpy_shape = tuple(reversed(dims))
        if ggml_type in _ELEMENT_TYPES:
            dtype, count = np.dtype(_ELEMENT_TYPES[ggml_type]).newbyteorder(self._order), n_elements
        else:
            dtype, count, numpy_shape = np.dtype(np.uint8), n_bytes, quant_shape_to_byte_shape(numpy_shape, ggml_type)
        start = data_start + offset
        if start + n_bytes > len(self._map):
            raise ModelFileError(f"{self.path}: tensor {name} runs past the end of the file")
        data = np.frombuffer(self._map, dtype, count, start).reshape(numpy_shape)
        return GGUFTensor(name, ggml_type, dims, n_elements, n_bytes, start, data)
