"""The model's per-layer element-wise ops in C++ (rms_norm.cpp, rotary.cpp, silu_and_mul.cpp):
the wrappers that check arguments and call the library.

Each has the torch path in engine/model/layers/ (norm.py, rotary.py, activation.py) as its
reference, with the same rounding to the model dtype at the same points.  `usable(x)` says whether
a tensor can take these ops here.  They run the engine's build of the library
(native_library.load()); `library=` names another build (native_library.load(isa)), for tests and
benchmarks.
"""

from __future__ import annotations

import ctypes

import torch

from engine.kernels.cpu import native_library
from engine.kernels.cpu.native_library import DTYPE_CODES


def usable(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype in DTYPE_CODES and native_library.load() is not None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None, *,
             library: ctypes.CDLL | None = None) -> torch.Tensor:
    """x [T, H] (rows may be strided) -> weight * norm(x), as a new [T, H] tensor.  With a residual
    [T, H] (contiguous), first residual <- x + residual in place, and the norm is of that sum."""
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"x must be 2-D with contiguous rows, got shape {tuple(x.shape)} strides {x.stride()}")
    rows, hidden = x.shape
    _check_same(x, weight, residual)
    if weight.shape != (hidden,) or not weight.is_contiguous():
        raise ValueError(f"weight must be contiguous ({hidden},), got {tuple(weight.shape)}")
    if residual is not None and (residual.shape != x.shape or not residual.is_contiguous()):
        raise ValueError(f"residual must be contiguous {tuple(x.shape)}, got {tuple(residual.shape)}")
    out = torch.empty(rows, hidden, dtype=x.dtype)
    _call(library, "rms_norm", x.data_ptr(), x.stride(0), None if residual is None else residual.data_ptr(),
          weight.data_ptr(), out.data_ptr(), rows, hidden, eps, DTYPE_CODES[x.dtype], torch.get_num_threads())
    return out


def rotary_embedding_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
                      library: ctypes.CDLL | None = None) -> torch.Tensor:
    """Rotate-half RoPE in place on x [T, heads, D] (heads contiguous, tokens may be strided);
    cos and sin [T, D / 2] contiguous, in x's dtype.  Returns x."""
    tokens, heads, head_dim = x.shape
    if x.stride(2) != 1 or x.stride(1) != head_dim or head_dim % 2:
        raise ValueError(f"x must be [T, heads, D] with contiguous heads and even D, got {tuple(x.shape)} "
                         f"strides {x.stride()}")
    _check_same(x, cos, sin)
    for name, table in (("cos", cos), ("sin", sin)):
        if table.shape != (tokens, head_dim // 2) or not table.is_contiguous():
            raise ValueError(f"{name} must be contiguous ({tokens}, {head_dim // 2}), got {tuple(table.shape)}")
    _call(library, "rotary_embedding", x.data_ptr(), tokens, heads, head_dim, x.stride(0), cos.data_ptr(),
          sin.data_ptr(), DTYPE_CODES[x.dtype], torch.get_num_threads())
    return x


def silu_and_mul(x: torch.Tensor, n: int | None = None, out: torch.Tensor | None = None, *,
                 library: ctypes.CDLL | None = None) -> torch.Tensor:
    """x [T, >= 2n] (gate in columns [0, n), up in [n, 2n); rows may be strided) -> silu(gate) *
    up [T, n], into `out` if given (rows may be strided).  n defaults to half of x's width."""
    tokens, width = x.shape
    n = width // 2 if n is None else n
    if x.stride(1) != 1 or 2 * n > width or (n == width // 2 and width % 2):
        raise ValueError(f"x must be [T, >= 2n] with contiguous rows, got {tuple(x.shape)} strides {x.stride()}")
    _check_same(x, out)
    if out is None:
        out = torch.empty(tokens, n, dtype=x.dtype)
    elif out.shape != (tokens, n) or out.stride(1) != 1:
        raise ValueError(f"out must be [{tokens}, {n}] with contiguous rows, got {tuple(out.shape)}")
    _call(library, "silu_and_mul", x.data_ptr(), x.stride(0), out.data_ptr(), out.stride(0), tokens, n,
          DTYPE_CODES[x.dtype], torch.get_num_threads())
    return out


def _check_same(x: torch.Tensor, *others: torch.Tensor | None) -> None:
    if x.device.type != "cpu" or x.dtype not in DTYPE_CODES:
        raise ValueError(f"native CPU ops do not handle {x.dtype} on {x.device}")
    for other in others:
        if other is not None and (other.dtype != x.dtype or other.device != x.device):
            raise ValueError(f"all tensors must be {x.dtype} on {x.device}, got {other.dtype} on {other.device}")


def _call(library: ctypes.CDLL | None, name: str, *args) -> None:
    if library is None:
        library = native_library.load()
    if library is None:
        raise RuntimeError("the native CPU kernels are not available on this machine (see the log)")
    if getattr(library, name)(*args) != 0:
        raise ValueError(f"{name}: arguments not supported by the kernel")
