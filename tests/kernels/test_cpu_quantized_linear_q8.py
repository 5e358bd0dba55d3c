"""The Q8-activation quantized linear (quantized_linear_q8.cpp) against its torch reference, the
same arithmetic spelled out: x rounded to Q8 blocks, integer block dot products, then one fp32
FMA per block (emulated in fp64 by the reference).  Every product and sum is then the same, so
every build this CPU runs, with and without VNNI, must give the reference's bits exactly, for
every row count (the tile heights and their tails), ragged column counts, prefix views of a
weight (an elastic submodel's), strided rows, bias, fp32 and bf16.
"""

from __future__ import annotations

import ctypes
import functools

import pytest
import torch

from engine.kernels.cpu import native_library
from engine.kernels.cpu.decode_layer import PanelArguments
from engine.kernels.cpu.quantized_linear import quantized_linear
from engine.kernels.cpu.quantized_linear_q8 import (
    pack_panels,
    panel_arguments,
    quantize_activations,
    quantized_linear_q8,
    quantized_linear_q8_reference,
    vnni_available,
)
from engine.kernels.cpu.quantized_weights import QuantFormat, QuantizedWeight, quantize

FORMATS = list(QuantFormat)
DTYPES = [torch.float32, torch.bfloat16]
ROW_COUNTS = [1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 31, 32, 33, 64]  # AVX2 tiles of 4, AVX-512 tiles of 8
SHAPES = [(7, 64), (100, 576), (35, 1536)]  # (N, K): N a multiple of neither 8 nor 16 columns


@pytest.fixture(params=[False, True], ids=["plain", "vnni"])
def vnni(request: pytest.FixtureRequest, library: ctypes.CDLL) -> bool:
    if request.param and not vnni_available(library):
        pytest.skip("this CPU (under the mask) has no VNNI for this build")
    return request.param


@functools.cache
def make_weight(n: int, k: int, fmt: QuantFormat) -> QuantizedWeight:
    generator = torch.Generator().manual_seed(n * 7919 + k)
    return quantize(torch.randn(n, k, generator=generator) * 0.05, fmt)


def activations(num_rows: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    x = torch.randn(num_rows, k)
    x[:, 5] *= 30  # an outlier channel, as LLM activations have: its block's scale is large
    if k >= 64:
        x[0, 32:64] = 0  # a block of zeros: scale 0
    return x.to(dtype)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference_exactly(library: ctypes.CDLL, vnni: bool, fmt: QuantFormat, dtype: torch.dtype) -> None:
    for n, k in SHAPES:
        weight = make_weight(n, k, fmt)
        x = activations(max(ROW_COUNTS), k, dtype)
        expected = quantized_linear_q8_reference(x, weight)
        for num_rows in ROW_COUNTS:
            got = quantized_linear_q8(x[:num_rows], weight, library=library, vnni=vnni)
            assert torch.equal(got, expected[:num_rows]), (n, k, num_rows)


def test_q8_0_weights_at_the_int8_extremes(library: ctypes.CDLL, vnni: bool) -> None:
    """Q8_0 quants of -128 and 127 (a GGUF file may hold -128; our quantizer never writes it):
    the VNNI tiles multiply x + 128 by the signed weight and subtract 128 times the block's weight
    sum, the plain ones |w| by x with w's sign; both must be exact, packed or not."""
    weight = make_weight(48, 576, QuantFormat.Q8_0)
    blocks = weight.blocks.clone().view(48, 18, 34)
    quants = blocks[:, :, 2:].view(torch.int8)
    quants[0::3, :, 0::2] = -128
    quants[1::3, :, 1::2] = 127
    quants[2::3] = -128  # a whole block at -128: its sum is the most negative a block has
    extreme = QuantizedWeight(blocks.view(48, -1), QuantFormat.Q8_0)
    x = activations(33, 576, torch.bfloat16)
    expected = quantized_linear_q8_reference(x, extreme)
    packed = pack_panels(extreme, library=library)
    for num_rows in [1, 4, 5, 8, 16, 33]:
        for w in (extreme, packed):
            got = quantized_linear_q8(x[:num_rows], w, library=library, vnni=vnni)
            assert torch.equal(got, expected[:num_rows]), num_rows


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_prefix_views_strided_rows_and_bias(library: ctypes.CDLL, vnni: bool, fmt: QuantFormat) -> None:
    """An elastic submodel's prefix of a weight (widths multiples of 32), rows of x that are the
    prefix of wider rows, a bias, and an out whose rows lie apart."""
    weight = make_weight(200, 576, fmt)
    x_wide = activations(37, 576, torch.bfloat16)
    for n, k in [(200, 576), (160, 320), (96, 32), (33, 544)]:
        view = weight.prefix(n, k)
        assert view.blocks.data_ptr() == weight.blocks.data_ptr()
        x = x_wide[:, :k]  # rows 576 elements apart
        bias = torch.randn(n).bfloat16()
        buffer = torch.full((x.shape[0], n + 20), 7.0, dtype=torch.bfloat16)
        out = buffer[:, 10:10 + n]
        assert quantized_linear_q8(x, view, bias, out=out, library=library, vnni=vnni) is out
        assert torch.equal(out, quantized_linear_q8_reference(x.contiguous(), view, bias))
        assert (buffer[:, :10] == 7).all() and (buffer[:, 10 + n:] == 7).all()


def test_fp16_and_empty(library: ctypes.CDLL) -> None:
    weight = make_weight(64, 96, QuantFormat.Q4_1)
    x = torch.randn(5, 96).half()
    assert torch.equal(quantized_linear_q8(x, weight, library=library), quantized_linear_q8_reference(x, weight))
    assert quantized_linear_q8(torch.randn(0, 96), weight, library=library).shape == (0, 64)
    assert quantized_linear_q8(x, weight.prefix(0), library=library).shape == (5, 0)
    bias = torch.randn(64)
    assert torch.equal(quantized_linear_q8(torch.randn(3, 0), weight.prefix(64, 0), bias, library=library),
                       bias.expand(3, 64))


def test_same_bits_on_any_thread_count(library: ctypes.CDLL) -> None:
    weight = make_weight(576, 576, QuantFormat.Q4_1)
    x = torch.randn(33, 576).bfloat16()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = quantized_linear_q8(x, weight, library=library)
        torch.set_num_threads(max(threads, 2))
        assert torch.equal(quantized_linear_q8(x, weight, library=library), single)
    finally:
        torch.set_num_threads(threads)


def test_activation_rounding() -> None:
    x = torch.zeros(1, 64)
    x[0, :32] = torch.linspace(-2.0, 1.0, 32)
    q, scale = quantize_activations(x)
    assert scale[0, 0].item() == pytest.approx(2.0 / 127) and scale[0, 1].item() == 0
    assert q[0, 0, 0].item() == -127 and (q[0, 1] == 0).all()
    assert (q[0, 0].float() * scale[0, 0] - x[0, :32]).abs().max() <= scale[0, 0] / 2 + 1e-7


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_close_to_the_exact_kernel(library: ctypes.CDLL, fmt: QuantFormat) -> None:
    """Rounding x to 8 bits moves each output by about 1% of its typical size, not more."""
    weight = make_weight(100, 576, fmt)
    x = torch.randn(16, 576)
    exact = quantized_linear(x, weight, library=library)
    error = (quantized_linear_q8(x, weight, library=library) - exact).norm() / exact.norm()
    assert error < 0.02


def test_bad_inputs_raise() -> None:
    weight = make_weight(16, 64, QuantFormat.Q4_0)
    with pytest.raises(ValueError):
        quantized_linear_q8(torch.randn(2, 96), weight)
    with pytest.raises(ValueError):
        quantized_linear_q8(torch.randn(2, 64).double(), weight)
    with pytest.raises(ValueError):
        quantized_linear_q8(torch.randn(2, 64), weight, out=torch.empty(2, 15))


class Q8Tile(ctypes.Structure):
    """quantized_linear_q8.h's Q8Tile (only the C++ decode layer builds these; this test mirrors it)."""

    _fields_ = [("weight", ctypes.c_void_p), ("weight_stride", ctypes.c_int64), ("bias", ctypes.c_void_p),
                ("out", ctypes.c_void_p), ("out_stride", ctypes.c_int64), ("m", ctypes.c_int64),
                ("n", ctypes.c_int64), ("block0", ctypes.c_int64), ("k_blocks", ctypes.c_int64),
                ("panels", PanelArguments)]


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_tiles_of_one_x_in_one_call_give_each_tiles_own_bits(library: ctypes.CDLL, vnni: bool,
                                                             fmt: QuantFormat) -> None:
    """quantized_linear_q8_tiles: several products of one x (row prefixes, input-block ranges,
    weight row ranges: an elastic step's column tiles), x quantized once, each the bits of its
    own quantized_linear_q8 call."""
    weight = make_weight(200, 576, fmt)
    packed = pack_panels(weight, library=library)
    x = activations(13, 576, torch.bfloat16)
    bias = torch.randn(200).bfloat16()
    # (rows of x, weight rows [start, end), input columns [start, end), with bias)
    tiles = [(13, (0, 64), (0, 576), True), (9, (64, 136), (0, 576), True), (2, (136, 200), (0, 576), False),
             (11, (0, 200), (64, 320), False), (5, (0, 200), (320, 576), False), (1, (100, 101), (544, 576), True)]
    outs = [torch.full((m, r1 - r0), 7.0, dtype=torch.bfloat16) for m, (r0, r1), _, _ in tiles]
    structs = (Q8Tile * len(tiles))()
    for i, (struct, out, (m, (r0, r1), (c0, c1), with_bias)) in enumerate(zip(structs, outs, tiles)):
        view = (packed if i % 2 else weight).rows(r0, r1).columns(c0, c1)  # every other tile reads packed panels
        struct.weight, struct.weight_stride = view.blocks.data_ptr(), view.row_stride
        struct.panels = PanelArguments(*panel_arguments(view.panels))
        struct.bias = bias[r0:r1].data_ptr() if with_bias else None
        struct.out, struct.out_stride, struct.m, struct.n = out.data_ptr(), out.stride()[0], m, r1 - r0
        struct.block0, struct.k_blocks = c0 // 32, (c1 - c0) // 32
    run = library.quantized_linear_q8_tiles
    run.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                    ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    run.restype = ctypes.c_int
    assert run(x.data_ptr(), x.stride()[0], 13, 18, structs, len(tiles), fmt.value, 1, int(vnni),
               torch.get_num_threads()) == 0
    for out, (m, (r0, r1), (c0, c1), with_bias) in zip(outs, tiles):
        alone = quantized_linear_q8(x[:m, c0:c1], weight.rows(r0, r1).columns(c0, c1),
                                    bias[r0:r1] if with_bias else None, library=library, vnni=vnni)
        assert torch.equal(out, alone), (m, r0, c0)
    # A tile reading blocks past x's, or more rows than x has, is refused.
    structs[0].k_blocks = 19
    assert run(x.data_ptr(), x.stride()[0], 13, 18, structs, 1, fmt.value, 1, int(vnni), 1) == -1
    structs[0].k_blocks, structs[0].m = 18, 14
    assert run(x.data_ptr(), x.stride()[0], 13, 18, structs, 1, fmt.value, 1, int(vnni), 1) == -1


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_panels_packed_at_load_give_the_bits_of_panels_packed_per_call(library: ctypes.CDLL, vnni: bool,
                                                                       fmt: QuantFormat, dtype: torch.dtype) -> None:
    """pack_panels: the whole weight packed once; every call, on the weight or on a view of it
    (an elastic tile's rows, a column range, a prefix), then reads its groups' panels where they
    lie, and gives the bits of the same call packing its own.  A view whose first row is off the
    build's panel width packs its own, as before."""
    for n, k in SHAPES:
        weight = make_weight(n, k, fmt)
        packed = pack_panels(weight, library=library)
        assert packed.panels is not None and torch.equal(packed.blocks, weight.blocks)
        x = activations(max(ROW_COUNTS), k, dtype)
        views = [lambda w: w, lambda w: w.prefix(max(1, n - 3))]
        if n >= 32:
            views += [lambda w: w.rows(16, n), lambda w: w.rows(3, n - 1)]
        if k >= 128:
            views += [lambda w: w.columns(32, k - 32), lambda w: w.rows(16, n).columns(64, k)]
        for view in views:
            packed_view, plain_view = view(packed), view(weight)
            for num_rows in ROW_COUNTS:
                rows = x[:num_rows, :plain_view.in_features]
                assert torch.equal(quantized_linear_q8(rows, packed_view, library=library, vnni=vnni),
                                   quantized_linear_q8(rows, plain_view, library=library, vnni=vnni)), (n, k, num_rows)


def test_panels_packed_by_another_build_are_ignored(library: ctypes.CDLL) -> None:
    """Panels have their build's vector width: a call through another build reads the blocks."""
    other = next((native_library.load(isa) for isa in ("avx2", "avx512", "avx512_bf16")
                  if native_library.load(isa) is not None
                  and native_library.load(isa).engine_cpu_kernel_isa() != library.engine_cpu_kernel_isa()), None)
    if other is None:
        pytest.skip("this CPU (under the mask) runs one build only")
    weight = make_weight(100, 576, QuantFormat.Q4_1)
    x = activations(32, 576, torch.bfloat16)
    got = quantized_linear_q8(x, pack_panels(weight, library=other), library=library, vnni=False)
    assert torch.equal(got, quantized_linear_q8_reference(x, weight))
