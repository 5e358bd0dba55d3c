"""Building, caching and declining the C++ CPU kernels: a fresh machine builds them once, and a
machine that cannot (no compiler, turned off) runs the torch path instead of failing."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch

from engine.kernels.cpu import native_library
from engine.kernels.cpu.native_backend import NativeCpuAttentionBackend
from engine.worker.attention import TorchAttentionBackend
from engine.worker.model_runner import make_attention_backend

from .paged_batch import make_metadata, random_block_tables, random_kv_cache


@pytest.fixture(autouse=True)
def _fresh_load_cache():
    native_library.load.cache_clear()
    yield
    native_library.load.cache_clear()  # later tests see this machine's real library again


@pytest.mark.skipif(shutil.which("g++") is None, reason="no C++ compiler")
def test_builds_into_an_empty_cache_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert native_library.load() is not None or not _has_avx512()
    built = list((tmp_path / "elastic-engine" / "kernels").glob("libengine_cpu_*.so"))
    assert len(built) == 1
    modified = built[0].stat().st_mtime_ns
    native_library.load.cache_clear()
    native_library.load()
    assert built[0].stat().st_mtime_ns == modified  # loaded from the cache, not rebuilt
    assert list(built[0].parent.iterdir()) == built  # no scratch left behind


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


def _has_avx512() -> bool:
    return "avx512f" in Path("/proc/cpuinfo").read_text()


def _assert_backend_matches_torch(backend) -> None:
    context_lens, query_lens = [20, 3, 0], [1, 1, 5]
    seq_lens = [c + q for c, q in zip(context_lens, query_lens)]
    block_tables = random_block_tables(seq_lens, 16, 8)
    meta, _ = make_metadata(context_lens, query_lens, 2, 16, block_tables)
    query, key, value = torch.randn(7, 4, 64), torch.randn(7, 2, 64), torch.randn(7, 2, 64)
    cache = random_kv_cache(8, 16, 2, 64, torch.float32)
    expected = TorchAttentionBackend().forward(query, key, value, cache.clone(), meta)
    meta.cache = None
    torch.testing.assert_close(backend.forward(query, key, value, cache, meta), expected)
