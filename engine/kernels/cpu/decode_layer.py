"""Decoder layers of an all-decode step in one call (decode_layer.cpp): the argument structures
and the wrapper.

The structures mirror the C++ ones field by field.  `LayerArguments` holds what stays from step to
step (weight pointers, sizes): built once per layer.  `LayerStack` is a run of consecutive layers
with their caches.  `StepArguments` is one step's (rows, RoPE tables, slots, block tables).
Checking the shapes is the caller's job (engine/model/layers/fused_decode.py builds them all from
the layers themselves): this is the hot path, one call for a step's run of layers.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from engine.kernels.cpu import native_library
from engine.kernels.cpu.quantized_linear_q8 import panel_arguments, usable_panels
from engine.kernels.cpu.quantized_weights import QuantizedWeight

_pointer, _i64, _i32, _f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_float


class PanelArguments(ctypes.Structure):
    """quantized_linear_q8.h's Q8Panels: packed panels (PackedPanels) or a null pointer."""

    _fields_ = [("packed", _pointer), ("k_blocks", _i64), ("row0", _i64), ("block0", _i64)]


class LinearArguments(ctypes.Structure):
    _fields_ = [("blocks", _pointer), ("row_stride", _i64), ("bias", _pointer), ("input_order", _pointer),
                ("out_features", _i64), ("in_features", _i64), ("format", _i32), ("panels", PanelArguments)]


class LevelArguments(ctypes.Structure):
    """One elastic level of one block: the columns it keeps and its side path (lora_a and
    lora_b_rows = lora_b^T, both [rank, hidden] fp32; bias [hidden] in the activations' dtype; null
    pointers where it has none)."""

    _fields_ = [("width", _i64), ("lora_a", _pointer), ("lora_b_rows", _pointer), ("bias", _pointer),
                ("rank", _i64)]


class LayerArguments(ctypes.Structure):
    _fields_ = [("qkv", LinearArguments), ("o", LinearArguments), ("gate_up", LinearArguments),
                ("down", LinearArguments), ("attention_levels", ctypes.POINTER(LevelArguments)),
                ("ffn_levels", ctypes.POINTER(LevelArguments)), ("num_levels", _i64), ("attention_norm", _pointer),
                ("ffn_norm", _pointer), ("eps", _f32),
                ("scale", _f32), ("hidden", _i32), ("num_q_heads", _i32), ("num_kv_heads", _i32),
                ("head_dim", _i32), ("intermediate", _i32), ("block_size", _i32), ("rank_major", _i32)]


class StepArguments(ctypes.Structure):
    _fields_ = [("rows", _i64), ("cos", _pointer), ("sin", _pointer), ("slot_mapping", _pointer),
                ("block_tables", _pointer), ("block_table_stride", _i64), ("seq_lens", _pointer),
                ("key_cache", _pointer), ("value_cache", _pointer), ("rows_upto", _pointer), ("order", _pointer),
                ("q8_above_rows", _i64), ("dtype", _i32), ("vnni", _i32), ("num_threads", _i32),
                ("kv_int8", _i32)]


def linear_arguments(weight: QuantizedWeight, bias: torch.Tensor | None,
                     input_order: torch.Tensor | None) -> LinearArguments:
    """`input_order` int64 [in_features]: the blocks store input input_order[j] at j (or None).
    The weight's packed panels go with it where the engine's build packed them."""
    return LinearArguments(weight.blocks.data_ptr(), weight.row_stride, None if bias is None else bias.data_ptr(),
                           None if input_order is None else input_order.data_ptr(), weight.out_features,
                           weight.in_features, weight.format.value, PanelArguments(*panel_arguments(usable_panels(weight))))


def elastic_side_path(lora_a: torch.Tensor | None, lora_b_rows: torch.Tensor | None, bias: torch.Tensor | None,
                      x: torch.Tensor, out: torch.Tensor, library: ctypes.CDLL | None = None) -> bool:
    """out [rows, hidden] += lora_b (lora_a x) + bias, in place, summed as the fused layer sums it
    (decode_layer.cpp, side_path_rows).  lora_a and lora_b_rows (= lora_b^T) [rank, hidden] fp32
    contiguous, bias [hidden] in out's dtype; x and out rows with unit column stride.  False where
    this cannot run (no library, other layouts): the caller's torch path then does it.
    `library`: another build than the engine's (native_library.load(isa)), for tests."""
    function = _side_path_entry(library)
    tensors = [t for t in (lora_a, lora_b_rows, bias) if t is not None]
    if (function is None or out.dtype not in native_library.DTYPE_CODES or x.dtype != out.dtype
            or x.stride(1) != 1 or out.stride(1) != 1 or not all(t.is_contiguous() for t in tensors)
            or any(t.dtype != torch.float32 for t in (lora_a, lora_b_rows) if t is not None)
            or (bias is not None and bias.dtype != out.dtype)):
        return False
    status = function(None if lora_a is None else lora_a.data_ptr(),
                      None if lora_b_rows is None else lora_b_rows.data_ptr(),
                      None if bias is None else bias.data_ptr(), 0 if lora_a is None else lora_a.shape[0],
                      out.shape[1], x.data_ptr(), x.stride(0), out.data_ptr(), out.stride(0), out.shape[0],
                      native_library.DTYPE_CODES[out.dtype])
    return status == 0


def is_available() -> bool:
    return _layers_entry() is not None


class LayerStack:
    """Consecutive layers of the model as one decode_layers call takes them: their arguments and
    each layer's K and V cache addresses.  Keeps the LayerArguments it points to alive."""

    def __init__(self, layers: list[LayerArguments], key_caches: list[int], value_caches: list[int]) -> None:
        self.layers = layers
        self.num_layers = len(layers)
        self.pointers = (ctypes.POINTER(LayerArguments) * self.num_layers)(*(ctypes.pointer(l) for l in layers))
        self.key_caches = (_pointer * self.num_layers)(*key_caches)
        self.value_caches = (_pointer * self.num_layers)(*value_caches)


def decode_layers(stack: LayerStack, step: StepArguments, x: torch.Tensor, residual: torch.Tensor | None,
                  attention_out: torch.Tensor, out: torch.Tensor, spare: torch.Tensor) -> None:
    """The stack's layers one after the other, each over its own cache (the step's cache fields
    are not read).  x, out, attention_out, spare [rows, hidden] contiguous and distinct; residual
    likewise or None (x is then the residual stream, updated in place).  The last layer's output
    lands in out; spare is scratch.  Raises if a kernel refused."""
    status = _layers_entry()(stack.pointers, stack.key_caches, stack.value_caches, stack.num_layers,
                             ctypes.byref(step), x.data_ptr(), None if residual is None else residual.data_ptr(),
                             attention_out.data_ptr(), out.data_ptr(), spare.data_ptr())
    if status != 0:
        raise ValueError("decode_layers: a kernel refused its arguments (shapes, dtype or build)")


def _layers_entry():
    return _bound("decode_layers", (ctypes.POINTER(ctypes.POINTER(LayerArguments)), ctypes.POINTER(_pointer),
                                    ctypes.POINTER(_pointer), _i64, ctypes.POINTER(StepArguments), _pointer, _pointer,
                                    _pointer, _pointer, _pointer))


def _side_path_entry(library: ctypes.CDLL | None = None):
    return _bound("elastic_side_path", (_pointer, _pointer, _pointer, _i64, _i64, _pointer, _i64, _pointer, _i64,
                                        _i64, ctypes.c_int), library)


@functools.cache
def _bound(name: str, argtypes: tuple, library: ctypes.CDLL | None = None):
    """The function `name` of `library` (the engine's build when None) with its argument types
    (returning int), or None without a library."""
    if library is None:
        library = native_library.load()
    if library is None:
        return None
    function = getattr(library, name)
    function.argtypes = list(argtypes)
    function.restype = ctypes.c_int
    return function
