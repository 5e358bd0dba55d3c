"""Building, caching, choosing and declining the C++ CPU kernels: a fresh machine builds its build
once, the CPU-feature mask chooses the build, and a machine that cannot have one (no compiler, a
CPU without the instruction set, turned off) runs the torch path instead of failing."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.capabilities import MASK_ENV, CpuFeatures, cpu_features
from engine.kernels.cpu import native_library
from engine.model.attention_backends.native_cpu_backend import NativeCpuAttentionBackend
from engine.model.attention_backends.metadata import TorchAttentionScratch
from engine.model.attention_backends.torch_backend import TorchAttentionBackend
from engine.model.attention_backends import make_attention_backend

from .paged_batch import make_metadata, random_block_tables, random_kv_cache


@pytest.fixture(autouse=True)
def _fresh_load_cache():
    native_library.load.cache_clear()
    yield
    native_library.load.cache_clear()  # later tests see this machine's real library again


@pytest.mark.skipif(shutil.which("g++") is None, reason="no C++ compiler")
@pytest.mark.skipif(cpu_features().kernel_isa is None, reason="this CPU runs no build of the kernels")
def test_builds_into_an_empty_cache_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert native_library.load() is not None
    built = list((tmp_path / "elastic-engine" / "kernels").glob("libengine_cpu_*.so"))
    assert len(built) == 1 and built[0].name.startswith(f"libengine_cpu_{cpu_features().kernel_isa}_")
    modified = built[0].stat().st_mtime_ns
    native_library.load.cache_clear()
    native_library.load()
    assert built[0].stat().st_mtime_ns == modified  # loaded from the cache, not rebuilt
    assert list(built[0].parent.iterdir()) == built  # no scratch left behind


@pytest.mark.skipif(cpu_features().kernel_isa is None, reason="this CPU runs no build: nothing to compile")
def test_no_compiler_means_the_torch_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CXX", "no-such-compiler")
    with caplog.at_level(logging.WARNING, logger=native_library.__name__):
        assert native_library.load() is None
    assert "torch path" in caplog.text
    _assert_backend_matches_torch(NativeCpuAttentionBackend())


def test_switched_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(native_library.DISABLE_ENV, "0")
    assert native_library.load() is None
    with pytest.raises(RuntimeError, match="native"):
        make_attention_backend("native", "cpu")
    backend = make_attention_backend("auto", "cpu")
    _assert_backend_matches_torch(backend)


@pytest.mark.parametrize("isa", list(native_library.ISA_FLAGS))
def test_each_build_is_compiled_for_its_instruction_set(isa: str) -> None:
    if isa not in cpu_features().kernel_isas:
        pytest.skip(f"this CPU cannot run the {isa} build ({cpu_features().describe()})")
    library = native_library.load(isa)
    if library is None:
        pytest.skip(f"the {isa} build is not available here (see the log)")
    assert library.engine_cpu_kernel_isa() == isa.encode()  # what simd.h saw of the build's flags


def test_a_build_the_cpu_lacks_is_declined(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    avx2_only = CpuFeatures(frozenset({"avx", "avx2", "fma", "f16c"}))
    monkeypatch.setattr(native_library, "cpu_features", lambda: avx2_only)
    with caplog.at_level(logging.INFO, logger=native_library.__name__):
        assert native_library.load("avx512") is None and native_library.load("avx512_bf16") is None
    assert "cannot run the avx512 build" in caplog.text
    if "avx2" in cpu_features().kernel_isas and shutil.which("g++") is not None:
        assert native_library.active_isa() == "avx2"
    with pytest.raises(ValueError, match="unknown"):
        native_library.load("sse2")


# Run in a fresh interpreter: the probe reads the mask once per process.
_UNDER_MASK = """
import engine, torch
from engine.kernels.cpu import layer_ops, native_library
from engine.model.attention_backends import make_attention_backend
from tests.kernels.test_cpu_native_library import _assert_backend_matches_torch
library = native_library.load()
print(native_library.active_isa(), library and library.engine_cpu_kernel_isa().decode(),
      layer_ops.usable(torch.ones(2, 8)))
_assert_backend_matches_torch(make_attention_backend("auto", "cpu"))
"""


@pytest.mark.parametrize("mask, expected", [("avx2", "avx2 avx2 True"), ("scalar", "None None False")])
def test_the_mask_chooses_the_build(mask: str, expected: str) -> None:
    """avx2: the AVX2 build even on an AVX-512 CPU; scalar: no build, and the torch path serves."""
    if mask == "avx2" and ("avx2" not in cpu_features().kernel_isas or shutil.which("g++") is None):
        pytest.skip("this machine cannot run the avx2 build")
    env = {**os.environ, MASK_ENV: mask, native_library.DISABLE_ENV: "1"}
    result = subprocess.run([sys.executable, "-c", _UNDER_MASK], env=env, cwd=Path(__file__).parents[2],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == expected


def _assert_backend_matches_torch(backend) -> None:
    context_lens, query_lens = [20, 3, 0], [1, 1, 5]
    seq_lens = [c + q for c, q in zip(context_lens, query_lens)]
    block_tables = random_block_tables(seq_lens, 16, 8)
    meta, _ = make_metadata(context_lens, query_lens, 2, 16, block_tables)
    query, key, value = torch.randn(7, 4, 64), torch.randn(7, 2, 64), torch.randn(7, 2, 64)
    cache = random_kv_cache(8, 16, 2, 64, torch.float32)
    expected = TorchAttentionBackend().forward(query, key, value, cache.clone(), meta)
    meta.scratch = TorchAttentionScratch()
    torch.testing.assert_close(backend.forward(query, key, value, cache, meta), expected)
