"""The quantized linear kernel (quantized_linear.cpp) against its torch reference, x.float() @
dequantize(W).T rounded once to x's dtype, and the block helpers against gguf's own code.

The weights are dequantized exactly, so the kernel differs from the reference only in fp32
summation order: in fp32 by ~1e-7 of sum |x_k w_k|, in bf16 by at most one last place (where the
two fp32 sums round to different neighbours).  That order is the kernel's own in every build and
batch, so builds, batch sizes and thread counts agree bit for bit.  Each kernel test runs every
build this CPU can run (an AVX-512 machine runs the AVX2 build too), except the grid against the
reference, which runs the engine's build: the others give its bits (test_builds_agree_bit_for_bit).
"""

from __future__ import annotations

import ctypes
import functools

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from engine.capabilities import cpu_features
from engine.gguf_file import GGUFFile
from engine.kernels.cpu import native_library
from engine.kernels.cpu.quantized_linear import quantized_linear, quantized_linear_reference, supports, vector_lanes
from engine.kernels.cpu.quantized_weights import (
    QuantFormat,
    QuantizedWeight,
    concat_rows,
    dequantize,
    from_blocks,
    from_gguf_tensor,
    quantize,
)

FORMATS = list(QuantFormat)
DTYPES = [torch.float32, torch.bfloat16]
SHAPES = [(192, 576), (576, 1536), (7, 64)]  # (N, K): K a multiple of 32, N not of any tile height


@pytest.fixture(scope="module")
def engine_library() -> ctypes.CDLL:
    """The build the engine runs (native_library.load())."""
    built = native_library.load()
    if built is None:
        pytest.skip(f"no build of the native kernels runs here ({cpu_features().describe()}, or no compiler)")
    return built


@functools.cache
def make_weight(n: int, k: int, fmt: QuantFormat) -> QuantizedWeight:
    """Random weights in `fmt` (cached: gguf's numpy quantizers take a while; nothing writes to them)."""
    generator = torch.Generator().manual_seed(n * 100_003 + k)
    return quantize(torch.randn(n, k, generator=generator) * 0.05, fmt)


def assert_matches(got: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """got ~ x.float() @ weight.T (+ bias): within 1e-5 of sum |x_k w_k| per element, and in
    bf16/fp16 also within one last place of the rounded reference."""
    expected = x.float() @ weight.T + (0 if bias is None else bias.float())
    tolerance = 1e-5 * (x.float().abs() @ weight.abs().T) + 1e-30
    assert got.dtype == x.dtype and got.shape == expected.shape
    if x.dtype == torch.float32:
        assert ((got - expected).abs() <= tolerance).all()
        return
    rounded = expected.to(x.dtype).float()
    ulp = torch.finfo(x.dtype).eps * rounded.abs().clamp_min(torch.finfo(x.dtype).tiny)
    assert ((got.float() - rounded).abs() <= ulp + tolerance).all()
    exact = (got.float() == rounded).float().mean().item()
    assert exact >= 0.97 or got.numel() < 100, f"only {exact:.3f} of elements round the same"


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_rows", [1, 3, 16, 33, 130])  # fused (<= 4), panel tiles with tails, two passes
@pytest.mark.parametrize("n, k", SHAPES)
def test_matches_reference(engine_library: ctypes.CDLL, fmt: QuantFormat, dtype: torch.dtype, num_rows: int,
                           n: int, k: int) -> None:
    weight = make_weight(n, k, fmt)
    x = torch.randn(num_rows, k).to(dtype)
    assert_matches(quantized_linear(x, weight, library=engine_library), x, dequantize(weight))


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("num_rows", [1, 4, 9])
def test_prefix_view_is_a_view_and_matches(library: ctypes.CDLL, fmt: QuantFormat, num_rows: int) -> None:
    weight = make_weight(200, 576, fmt)
    full = dequantize(weight)
    for n, k in [(200, 576), (131, 576), (200, 320), (77, 32), (1, 544)]:
        view = weight.prefix(n, k)
        assert view.blocks.data_ptr() == weight.blocks.data_ptr() and view.row_stride == weight.row_stride
        assert (view.out_features, view.in_features) == (n, k)
        assert torch.equal(dequantize(view), full[:n, :k])
        x = torch.randn(num_rows, 576).bfloat16()[:, :k]  # the prefix of wider activation rows: strided
        assert_matches(quantized_linear(x, view, library=library), x, full[:n, :k])


@pytest.mark.parametrize("num_rows", [2, 20])
def test_bias_strided_rows_and_out(library: ctypes.CDLL, num_rows: int) -> None:
    weight = make_weight(97, 128, QuantFormat.Q4_1)
    x = torch.randn(num_rows, 300).bfloat16()[:, 100:228]
    bias = torch.randn(97).bfloat16()
    buffer = torch.full((num_rows, 120), 7.0, dtype=torch.bfloat16)
    out = buffer[:, 10:107]  # rows 120 apart
    assert quantized_linear(x, weight, bias, out=out, library=library) is out
    assert_matches(out, x, dequantize(weight), bias)
    assert (buffer[:, :10] == 7).all() and (buffer[:, 107:] == 7).all()  # nothing written outside out


def test_fp16_and_empty(library: ctypes.CDLL) -> None:
    weight = make_weight(64, 96, QuantFormat.Q8_0)
    x = torch.randn(5, 96).half()
    assert_matches(quantized_linear(x, weight, library=library), x, dequantize(weight))
    assert quantized_linear(torch.randn(0, 96), weight, library=library).shape == (0, 64)
    assert (quantized_linear(torch.randn(3, 0), weight.prefix(64, 0), library=library) == 0).all()
    assert quantized_linear(x, weight.prefix(0), library=library).shape == (5, 0)


def test_each_build_takes_its_vector_path(library: ctypes.CDLL) -> None:
    """quantized_linear.cpp picks its path from the build's flags on its own (not through simd.h)."""
    assert vector_lanes(library) == (8 if library.engine_cpu_kernel_isa() == b"avx2" else 16)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_builds_agree_bit_for_bit(library: ctypes.CDLL, engine_library: ctypes.CDLL, fmt: QuantFormat) -> None:
    """16 partial sums per dot product and one tree in every build: the engine's build's bits."""
    weight = make_weight(67, 1536, fmt)
    for num_rows in (1, 3, 4, 5, 33):
        for dtype in DTYPES:
            x = torch.randn(num_rows, 1536).to(dtype)
            expected = quantized_linear(x, weight, library=engine_library)
            assert torch.equal(quantized_linear(x, weight, library=library), expected)


def test_a_row_does_not_depend_on_its_batch(library: ctypes.CDLL) -> None:
    """The fused (M <= 4) and panel (M > 4) paths, and the passes of a long prefill, sum alike."""
    weight = make_weight(100, 1536, QuantFormat.Q4_1)
    x = torch.randn(200, 1536).bfloat16()  # 200 rows: three passes of 84 (kPassBytes)
    whole = quantized_linear(x, weight, library=library)
    for start, stop in [(0, 1), (7, 8), (9, 12), (13, 17), (150, 200)]:
        assert torch.equal(quantized_linear(x[start:stop], weight, library=library), whole[start:stop])


def test_same_bits_on_any_thread_count(library: ctypes.CDLL) -> None:
    """Each output is one thread's dot product in a fixed order, whichever thread computes it."""
    weight = make_weight(576, 576, QuantFormat.Q4_0)
    x = torch.randn(33, 576).bfloat16()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = quantized_linear(x, weight, library=library)
        torch.set_num_threads(max(threads, 2))
        assert torch.equal(quantized_linear(x, weight, library=library), single)
    finally:
        torch.set_num_threads(threads)


def test_matches_reference_function(library: ctypes.CDLL) -> None:
    weight = make_weight(64, 64, QuantFormat.Q4_1)
    x = torch.randn(3, 64)
    torch.testing.assert_close(quantized_linear(x, weight, library=library), quantized_linear_reference(x, weight))
    assert supports(weight, torch.bfloat16) == (native_library.load() is not None)
    assert not supports(weight, torch.int32)


def test_bad_inputs_raise() -> None:
    """The wrapper's checks, before any build is looked up."""
    weight = make_weight(16, 64, QuantFormat.Q4_0)
    x = torch.randn(2, 64)
    cases = {
        "features": lambda: quantized_linear(torch.randn(2, 96), weight),
        "1-D x": lambda: quantized_linear(torch.randn(64), weight),
        "x columns strided": lambda: quantized_linear(torch.randn(64, 2).T, weight),
        "int x": lambda: quantized_linear(x.int(), weight),
        "float64 x": lambda: quantized_linear(x.double(), weight),
        "bias shape": lambda: quantized_linear(x, weight, torch.randn(15)),
        "bias dtype": lambda: quantized_linear(x, weight, torch.randn(16).bfloat16()),
        "out shape": lambda: quantized_linear(x, weight, out=torch.empty(2, 15)),
        "out dtype": lambda: quantized_linear(x, weight, out=torch.empty(2, 16).bfloat16()),
        "not a QuantizedWeight": lambda: quantized_linear(x, torch.randn(16, 64)),
    }
    for name, call in cases.items():
        with pytest.raises(ValueError):
            call()
            pytest.fail(name)


def test_bad_weights_raise() -> None:
    weight = make_weight(16, 64, QuantFormat.Q4_1)
    with pytest.raises(ValueError, match="multiple of 32"):
        weight.prefix(16, 48)
    with pytest.raises(ValueError, match="outside"):
        weight.prefix(17)
    with pytest.raises(ValueError, match="whole 20-byte blocks"):
        QuantizedWeight(weight.blocks[:, :30], QuantFormat.Q4_1)
    with pytest.raises(ValueError, match="uint8"):
        QuantizedWeight(weight.blocks.int(), QuantFormat.Q4_1)
    with pytest.raises(ValueError, match="contiguous"):
        QuantizedWeight(torch.zeros(40, 4, dtype=torch.uint8).T, QuantFormat.Q4_1)
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize(torch.randn(4, 40))
    with pytest.raises(ValueError, match="Q5_K"):
        QuantFormat.from_ggml(GGMLQuantizationType.Q5_K)
    with pytest.raises(ValueError, match="share format"):
        concat_rows([weight, make_weight(4, 64, QuantFormat.Q8_0)])


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_dequantize_is_gguf_dequantize(fmt: QuantFormat) -> None:
    weight = make_weight(40, 160, fmt)
    expected = gguf_dequantize(weight.blocks.numpy(), fmt.ggml_type)
    assert torch.equal(dequantize(weight), torch.from_numpy(expected))
    assert torch.equal(dequantize(from_blocks(weight.blocks.numpy(), fmt)), dequantize(weight))
    halves = [weight.prefix(40)] * 2
    assert torch.equal(dequantize(concat_rows(halves)), torch.cat([dequantize(weight)] * 2))


@pytest.fixture(scope="module")
def model_reader() -> GGUFFile:
    from engine.config import ModelFileError
    from engine.model.gguf_loader import open_gguf
    from engine.model.loader import default_model_path

    try:
        return open_gguf(default_model_path())
    except ModelFileError as error:
        pytest.skip(str(error))


@pytest.mark.slow  # the real model's tensors
@pytest.mark.parametrize("name, num_rows", [("blk.0.attn_q.weight", 576), ("token_embd.weight", 3000)])
def test_real_gguf_blocks(engine_library: ctypes.CDLL, model_reader: GGUFFile, name: str, num_rows: int) -> None:
    """The default model's own blocks (Q4_1 projections, the Q8_0 tied embedding / LM head)."""
    tensor = next(t for t in model_reader.tensors if t.name == name)
    weight = from_gguf_tensor(tensor).prefix(num_rows)
    expected = gguf_dequantize(np.asarray(tensor.data[:num_rows]), tensor.tensor_type)
    assert torch.equal(dequantize(weight), torch.from_numpy(expected))
    x = torch.randn(5, weight.in_features).bfloat16()
    assert_matches(quantized_linear(x, weight, library=engine_library), x, torch.from_numpy(expected))
