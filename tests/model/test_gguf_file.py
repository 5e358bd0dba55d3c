"""The engine's GGUF reader (engine/gguf_file.py) against the `gguf` package's own GGUFReader: the
same fields and the same tensors, byte for byte, on the real model file and on files gguf's writer
makes here (every metadata value type, arrays of arrays, a custom alignment, big-endian); and a
clear error for what is not a GGUF file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q, GGUFEndian, GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import quantize

from engine.config import ModelFileError
from engine.gguf_file import GGUFFile
from engine.model.loader import default_model_path


def assert_same_file(path: str | Path) -> None:
    ours, theirs = GGUFFile(path), GGUFReader(path)
    assert list(ours.fields) == list(theirs.fields)
    for key, field in theirs.fields.items():
        assert ours.fields[key].contents() == field.contents(), key
        assert list(ours.fields[key].types) == list(field.types), key
    assert len(ours.tensors) == len(theirs.tensors) > 0
    for mine, reference in zip(ours.tensors, theirs.tensors):
        assert (mine.name, mine.tensor_type, mine.n_elements, mine.n_bytes, mine.data_offset) == (
            reference.name, reference.tensor_type, reference.n_elements, reference.n_bytes, reference.data_offset)
        assert mine.shape == tuple(int(d) for d in reference.shape)
        assert mine.data.shape == reference.data.shape and mine.data.dtype == reference.data.dtype, mine.name
        assert np.array_equal(mine.data, reference.data), mine.name
        assert not mine.data.flags.writeable  # a view of the read-only mapping, never a copy


def test_the_default_model_reads_as_gguf_reads_it() -> None:
    assert_same_file(default_model_path())


def write_file(path: Path, endianess: GGUFEndian = GGUFEndian.LITTLE, alignment: int | None = None,
               arch: str = "llama") -> Path:
    writer = GGUFWriter(str(path), arch, endianess=endianess)
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    writer.add_uint8("test.u8", 200)
    writer.add_int8("test.i8", -5)
    writer.add_uint16("test.u16", 65000)
    writer.add_int16("test.i16", -300)
    writer.add_uint32("test.u32", 4_000_000_000)
    writer.add_int32("test.i32", -7)
    writer.add_float32("test.f32", 0.25)
    writer.add_uint64("test.u64", 2**63 + 5)
    writer.add_int64("test.i64", -(2**40))
    writer.add_float64("test.f64", 1e-300)
    writer.add_bool("test.bool", True)
    writer.add_string("test.str", "héllo ☃")
    writer.add_array("test.ints", [1, 2, 3])
    writer.add_array("test.floats", [0.5, -1.5])
    writer.add_array("test.strings", ["a", "", "ünï"])
    writer.add_array("test.nested", [[1, 2], [3, 4]])
    writer.add_array("test.empty", [])
    rng = np.random.default_rng(0)
    writer.add_tensor("f32", rng.standard_normal((3, 5)).astype(np.float32))
    writer.add_tensor("f16", rng.standard_normal((4, 8)).astype(np.float16))
    writer.add_tensor("q8_0", quantize(rng.standard_normal((2, 64)).astype(np.float32), Q.Q8_0), raw_dtype=Q.Q8_0)
    writer.add_tensor("q4_1", quantize(rng.standard_normal((3, 32)).astype(np.float32), Q.Q4_1), raw_dtype=Q.Q4_1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("endianess", [GGUFEndian.LITTLE, GGUFEndian.BIG], ids=["little", "big"])
@pytest.mark.parametrize("alignment", [None, 64], ids=["default-alignment", "alignment-64"])
def test_every_value_type_reads_as_gguf_reads_it(tmp_path: Path, endianess: GGUFEndian, alignment: int | None) -> None:
    path = write_file(tmp_path / "all.gguf", endianess, alignment)
    assert_same_file(path)
    ours = GGUFFile(path)
    assert ours.fields["test.nested"].types == (GGUFValueType.ARRAY, GGUFValueType.ARRAY, GGUFValueType.INT32)
    assert ours.fields["test.u64"].contents() == 2**63 + 5 and ours.fields["test.str"].contents() == "héllo ☃"


def test_a_file_that_is_not_gguf_is_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGML" + bytes(60))
    with pytest.raises(ModelFileError, match="not a GGUF file"):
        GGUFFile(path)


@pytest.mark.parametrize("cut", ["data", "header", "vocabulary", "empty"])
def test_a_file_cut_short_is_refused_by_name(tmp_path: Path, cut: str) -> None:
    whole = write_file(tmp_path / "whole.gguf").read_bytes()
    end = {"data": len(whole) - 100, "header": 6, "vocabulary": 200, "empty": 0}[cut]
    path = tmp_path / "cut.gguf"
    path.write_bytes(whole[:end])
    with pytest.raises(ModelFileError, match=str(path)):
        GGUFFile(path)


def test_an_architecture_the_engine_does_not_run_is_refused_naming_the_file(tmp_path: Path) -> None:
    from engine.model.loader import resolve_model

    path = write_file(tmp_path / "other.gguf", arch="mamba")
    with pytest.raises(ModelFileError, match=f"{path}: unsupported GGUF architecture 'mamba'"):
        resolve_model(str(path))
