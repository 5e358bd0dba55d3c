"""y = x W^T (+ bias) with W as quantization blocks and x quantized to Q8 blocks on the way in
(quantized_linear_q8.cpp): the wrapper that checks arguments and calls the library, and the
torch reference of the same arithmetic.

Unlike quantized_linear (which reads x as fp32 and is the exact reference path), this rounds
every 32 activations of a row to int8 with one fp32 scale, so it changes the numbers a little,
as llama.cpp does; in exchange each block's dot product is integer arithmetic, about a quarter
of the fp32 one's instructions.  `quantized_linear_q8_reference` is the arithmetic spelled out
(the kernel's header has it in formulas); every build and variant gives its bits, up to the
rare double rounding of the reference's fp32 FMA (emulated in fp64).

`vnni=None` uses VNNI's dot-product instruction where the capability probe (under
ELASTIC_ENGINE_CPU_ISA) reports it for the build: AVX-VNNI for the AVX2 build, AVX512-VNNI for
the AVX-512 builds.  Same results either way.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from typing import NamedTuple

import torch

from engine.capabilities import cpu_features
from engine.kernels.cpu import native_library
from engine.kernels.cpu.quantized_linear import check_arguments, check_out
from engine.kernels.cpu.quantized_weights import BLOCK_SIZE, PackedPanels, QuantFormat, QuantizedWeight

Q8_MAX = 127


def is_available(library: ctypes.CDLL | None = None) -> bool:
    """Whether the library (and so this kernel) loads on this machine."""
    return _kernel(library) is not None


@functools.cache
def vnni_available(library: ctypes.CDLL | None = None) -> bool:
    """Whether the probe (under the mask) reports the VNNI variant of this build's ISA, and the
    build's own CPU check agrees.  Cached: the probe is read once a process, and a decode step
    asks ~120 times."""
    kernel = _kernel(library)
    if kernel is None:
        return False
    feature = "avx_vnni" if _isa(library) == "avx2" else "avx512_vnni"
    return cpu_features().has(feature) and kernel.has_vnni() == 1


def quantized_linear_q8(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None = None,
                        out: torch.Tensor | None = None, *, library: ctypes.CDLL | None = None,
                        vnni: bool | None = None) -> torch.Tensor:
    """x [M, K] (fp32, bf16 or fp16; rows may be strided) times weight [N, K] -> y [M, N] in x's
    dtype, written into `out` when given ([M, N], rows may be strided).  bias: [N] in x's dtype.
    vnni: None picks it where the probe reports it; True on a CPU without it raises."""
    dtype_code = check_arguments(x, weight, bias)
    out = check_out(out, x, weight.out_features)
    kernel = _kernel(library)
    if kernel is None:
        raise RuntimeError("the native CPU kernels are not available on this machine (see the log)")
    use_vnni = vnni_available(library) if vnni is None else vnni
    status = kernel.run(x.data_ptr(), x.stride()[0], weight.blocks.data_ptr(), weight.row_stride,
                        None if bias is None else bias.data_ptr(), out.data_ptr(), out.stride()[0], x.shape[0],
                        weight.out_features, weight.in_features // BLOCK_SIZE, weight.format.value, dtype_code,
                        int(use_vnni), torch.get_num_threads(), *panel_arguments(usable_panels(weight, library)))
    if status != 0:
        raise ValueError(f"quantized_linear_q8: {weight.format.name} with {x.dtype}"
                         f"{' and VNNI' if use_vnni else ''} not supported by this build or CPU")
    return out


def pack_panels(weight: QuantizedWeight, *, library: ctypes.CDLL | None = None) -> QuantizedWeight:
    """The weight with its panels packed (once, at load: PackedPanels), for the calls of more rows
    than the row-major GEMV takes; the weight itself unchanged (without a library: as it was)."""
    kernel = _kernel(library)
    if kernel is None or weight.out_features == 0:
        return weight
    k_blocks = weight.in_features // BLOCK_SIZE
    size = kernel.packed_bytes(weight.out_features, k_blocks, weight.format.value)
    packed = torch.empty(max(size, 0), dtype=torch.uint8)
    if size < 0 or kernel.pack(weight.blocks.data_ptr(), weight.row_stride, weight.out_features, k_blocks,
                               weight.format.value, packed.data_ptr(), torch.get_num_threads()) != 0:
        raise ValueError(f"quantized_linear_q8: cannot pack a {weight.format.name} weight")
    return QuantizedWeight(weight.blocks, weight.format, PackedPanels(packed, _isa(library), k_blocks))


def usable_panels(weight: QuantizedWeight, library: ctypes.CDLL | None = None) -> PackedPanels | None:
    """The weight's packed panels where `library` (None: the engine's build) packs the same layout."""
    return weight.panels if weight.panels is not None and weight.panels.isa == _isa(library) else None


def panel_arguments(panels: PackedPanels | None) -> tuple[int | None, int, int, int]:
    """The kernel's (packed, packed_k_blocks, packed_row0, packed_block0) arguments."""
    if panels is None:
        return None, 0, 0, 0
    return panels.packed.data_ptr(), panels.k_blocks, panels.row0, panels.block0


@functools.cache
def _isa(library: ctypes.CDLL | None) -> str | None:
    """The build's ISA name (cached: the hot path asks once a call)."""
    return library.engine_cpu_kernel_isa().decode() if library is not None else native_library.active_isa()


class QuantizedActivations(NamedTuple):
    """x [M, K] as Q8 blocks: q int32 [M, K / 32, 32] in [-127, 127], scale d fp32 [M, K / 32]."""

    q: torch.Tensor
    scale: torch.Tensor


def quantize_activations(x: torch.Tensor) -> QuantizedActivations:
    """The kernel's activation rounding: per block d = max|x| / 127, q = round(x / d), as
    round_half_even(clamp(x * (1 / d), -127, 127)) in fp32 (0 where d is 0)."""
    blocks = x.float().reshape(x.shape[0], -1, BLOCK_SIZE)
    scale = blocks.abs().amax(dim=-1) / Q8_MAX
    inverse = torch.where(scale != 0, 1.0 / scale, torch.zeros_like(scale))
    q = (blocks * inverse.unsqueeze(-1)).clamp(-Q8_MAX, Q8_MAX).round().int()
    return QuantizedActivations(q, scale)


def quantized_linear_q8_reference(x: torch.Tensor, weight: QuantizedWeight,
                                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """The kernel's arithmetic in torch: integer block dot products, scaled and summed in fp32
    block after block (each step an FMA, emulated in fp64), + bias, rounded to x's dtype."""
    activations = quantize_activations(x)
    weight_q, weight_scale, weight_min = _weight_blocks(weight)
    isum = torch.einsum("mbj,nbj->mnb", activations.q.double(), weight_q.double())  # exact: < 2^53
    asum = activations.q.sum(dim=-1).double()  # [M, B]
    if weight.format == QuantFormat.Q4_0:
        isum = isum - 8 * asum.unsqueeze(1)
    scale = (weight_scale.unsqueeze(0) * activations.scale.unsqueeze(1)).double()  # dw * dx rounded to fp32
    block_sum = (activations.scale * asum.float()).double()  # s = d * asum, fp32
    acc = torch.zeros(x.shape[0], weight.out_features, dtype=torch.float32)
    for b in range(isum.shape[-1]):
        acc = (scale[..., b] * isum[..., b] + acc.double()).float()
        if weight.format == QuantFormat.Q4_1:
            acc = (weight_min[:, b].double().unsqueeze(0) * block_sum[:, b].unsqueeze(1) + acc.double()).float()
    if bias is not None:
        acc = acc + bias.float()
    return acc.to(x.dtype)


def _weight_blocks(weight: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The weight's integers as the kernel multiplies them ([N, B, 32]: Q4 as 0..15, Q8_0 as
    int8), its scales dw and (Q4_1) mins mw as fp32 [N, B]."""
    num_blocks = weight.in_features // BLOCK_SIZE
    blocks = weight.blocks.reshape(weight.out_features, num_blocks, weight.format.block_bytes)
    scale = blocks[..., 0:2].contiguous().view(torch.float16).float().squeeze(-1)
    minimum = torch.zeros_like(scale)
    if weight.format == QuantFormat.Q8_0:
        return blocks[..., 2:].contiguous().view(torch.int8).int(), scale, minimum
    if weight.format == QuantFormat.Q4_1:
        minimum = blocks[..., 2:4].contiguous().view(torch.float16).float().squeeze(-1)
    nibbles = blocks[..., 4:] if weight.format == QuantFormat.Q4_1 else blocks[..., 2:]
    return torch.cat([nibbles & 0xF, nibbles >> 4], dim=-1).int(), scale, minimum


class _Kernel(NamedTuple):
    run: Callable[..., int]  # quantized_linear_q8
    has_vnni: Callable[[], int]  # quantized_linear_q8_has_vnni
    packed_bytes: Callable[..., int]  # quantized_linear_q8_packed_bytes
    pack: Callable[..., int]  # quantized_linear_q8_pack_panels


def _kernel(library: ctypes.CDLL | None) -> _Kernel | None:
    """The build's entry points with their signatures declared, or None without a library."""
    return native_library.entry_points(library, _declared)


@functools.cache
def _declared(library: ctypes.CDLL) -> _Kernel:
    pointer, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    run, has_vnni = library.quantized_linear_q8, library.quantized_linear_q8_has_vnni
    packed_bytes, pack = library.quantized_linear_q8_packed_bytes, library.quantized_linear_q8_pack_panels
    # x, x_stride, weight, weight_stride, bias, out, out_stride, m, n, k_blocks, format, dtype, vnni, threads,
    # packed, packed_k_blocks, packed_row0, packed_block0
    run.argtypes = [pointer, i64, pointer, i64, pointer, pointer, i64, i64, i64, i64, i32, i32, i32, i32,
                    pointer, i64, i64, i64]
    run.restype = i32
    has_vnni.argtypes = []
    has_vnni.restype = i32
    packed_bytes.argtypes = [i64, i64, i32]  # n, k_blocks, format
    packed_bytes.restype = i64
    pack.argtypes = [pointer, i64, i64, i64, i32, pointer, i32]  # weight, stride, n, k_blocks, format, packed, threads
    pack.restype = i32
    return _Kernel(run, has_vnni, packed_bytes, pack)
