"""y = x W^T (+ bias) with W as quantization blocks (quantized_linear.cpp): the wrapper that checks
arguments and calls the library, and the torch reference it matches.

The kernel dequantizes W exactly (as `quantized_weights.dequantize`), reads x as fp32, sums in
fp32 and rounds y once to x's dtype: `quantized_linear_reference` up to fp32 summation order, an
order that every build (AVX-512, AVX2) and every batch shares, so their bits agree.  The calls run
the engine's build of the library (native_library.load()); `library=` names another build
(native_library.load(isa)), for tests and benchmarks.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from typing import NamedTuple

import torch

from engine.kernels.cpu import native_library
from engine.kernels.cpu.native_library import DTYPE_CODES
from engine.kernels.cpu.quantized_weights import BLOCK_SIZE, QuantizedWeight, dequantize


def is_available(library: ctypes.CDLL | None = None) -> bool:
    """Whether the library (and so this kernel) loads on this machine."""
    return _kernel(library) is not None


def supports(weight: QuantizedWeight, dtype: torch.dtype) -> bool:
    """Whether the kernel can multiply activations of `dtype` by this weight here."""
    return dtype in DTYPE_CODES and weight.blocks.is_cpu and is_available()


def vector_lanes(library: ctypes.CDLL | None = None) -> int | None:
    """fp32 lanes of the kernel's code path in a build (16 AVX-512, 8 AVX2); None without a library."""
    kernel = _kernel(library)
    return None if kernel is None else kernel.lanes()


def quantized_linear(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None = None,
                     out: torch.Tensor | None = None, *, library: ctypes.CDLL | None = None) -> torch.Tensor:
    """x [M, K] (fp32, bf16 or fp16; rows may be strided) times weight [N, K] -> y [M, N] in x's
    dtype, written into `out` when given ([M, N], rows may be strided).  bias: [N] in x's dtype."""
    # PERF: a decode step makes ~120 of these calls, so the checks use torch's cheapest accessors
    # (x.is_cpu, not x.device.type; the weight's sizes are fields): ~3 us beside ~2.6 us for the
    # ctypes call itself (it was ~5.5 us).
    dtype_code = check_arguments(x, weight, bias)
    out = check_out(out, x, weight.out_features)
    kernel = _kernel(library)
    if kernel is None:
        raise RuntimeError("the native CPU kernels are not available on this machine (see the log)")
    status = kernel.run(x.data_ptr(), x.stride()[0], weight.blocks.data_ptr(), weight.row_stride,
                        None if bias is None else bias.data_ptr(), out.data_ptr(), out.stride()[0], x.shape[0],
                        weight.out_features, weight.in_features // BLOCK_SIZE, weight.format.value, dtype_code,
                        torch.get_num_threads())
    if status != 0:
        raise ValueError(f"quantized_linear: {weight.format.name} with {x.dtype} not supported by this build")
    return out


def quantized_linear_reference(x: torch.Tensor, weight: QuantizedWeight,
                               bias: torch.Tensor | None = None) -> torch.Tensor:
    """What the kernel computes, in torch: x.float() @ dequantized(W).T (+ bias), rounded to x's dtype."""
    y = x.float() @ dequantize(weight).T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def check_out(out: torch.Tensor | None, x: torch.Tensor, num_out: int) -> torch.Tensor:
    """`out`, checked to be [M, num_out] in x's dtype with contiguous rows, or a new tensor."""
    num_rows = x.shape[0]
    if out is None:
        return torch.empty(num_rows, num_out, dtype=x.dtype)
    if out.shape != (num_rows, num_out) or out.dtype != x.dtype or not out.is_cpu or out.stride()[1] != 1:
        raise ValueError(f"out must be [{num_rows}, {num_out}] {x.dtype} on the CPU with contiguous rows, got "
                         f"{tuple(out.shape)} {out.dtype} strides {out.stride()}")
    return out


def check_arguments(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None) -> int:
    """Raises ValueError for arguments the quantized kernels cannot take; returns x's dtype code."""
    if not isinstance(weight, QuantizedWeight):
        raise ValueError(f"weight must be a QuantizedWeight, got {type(weight).__name__}")
    dtype_code = DTYPE_CODES.get(x.dtype)
    if dtype_code is None or not x.is_cpu:
        raise ValueError(f"x must be fp32, bf16 or fp16 on the CPU, got {x.dtype} on {x.device}")
    if x.dim() != 2 or (x.stride()[1] != 1 and x.shape[1] > 1):
        raise ValueError(f"x must be 2-D with contiguous rows, got shape {tuple(x.shape)} strides {x.stride()}")
    if x.shape[1] != weight.in_features:
        raise ValueError(f"x has {x.shape[1]} features, the weight takes {weight.in_features}")
    if bias is not None and (bias.shape != (weight.out_features,) or bias.dtype != x.dtype or not bias.is_cpu
                             or not bias.is_contiguous()):
        raise ValueError(f"bias must be contiguous [{weight.out_features}] {x.dtype} on the CPU, got "
                         f"{tuple(bias.shape)} {bias.dtype} on {bias.device}")
    return dtype_code


class _Kernel(NamedTuple):
    run: Callable[..., int]  # quantized_linear
    lanes: Callable[[], int]  # quantized_linear_lanes


def _kernel(library: ctypes.CDLL | None) -> _Kernel | None:
    """The build's entry points with their signatures declared, or None without a library."""
    return native_library.entry_points(library, _declared)


@functools.cache
def _declared(library: ctypes.CDLL) -> _Kernel:
    pointer, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    run, lanes = library.quantized_linear, library.quantized_linear_lanes
    # x, x_stride, weight, weight_stride, bias, out, out_stride, m, n, k_blocks, format, dtype, threads
    run.argtypes = [pointer, i64, pointer, i64, pointer, pointer, i64, i64, i64, i64, i32, i32, i32]
    run.restype = i32
    lanes.argtypes = []
    lanes.restype = i32
    return _Kernel(run, lanes)
