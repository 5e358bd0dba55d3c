"""The capability probe: CPU features under the ELASTIC_ENGINE_CPU_ISA mask, the library settings
it hands torch and oneDNN, and the dtype choice made from it.  Mask effects on torch are checked in
fresh interpreters: the probe and the libraries read them once per process."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from engine.capabilities import (
    MASK_ENV,
    CapabilityError,
    CpuFeatures,
    apply_mask,
    cpu_features,
    library_env,
    parse_mask,
)
from engine.model.compute_plan import (
    ComputePlan,
    dense_rows_threshold,
    q8_rows_threshold,
    resolve_dtype,
    resolve_weight_format,
)

ZEN4 = frozenset("sse4_2 avx avx2 fma f16c avx_vnni avx512f avx512bw avx512vl avx512dq avx512cd avx512_vnni "
                 "avx512_bf16".split())
EPYC_AVX2 = frozenset("sse4_2 avx avx2 fma f16c".split())


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items()
                   if k not in (MASK_ENV, "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA",
                                "MKL_ENABLE_INSTRUCTIONS")} | env
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment, timeout=120)


def test_mask_levels_drop_everything_above_them():
    assert apply_mask(ZEN4, None) == ZEN4
    avx2 = CpuFeatures(apply_mask(ZEN4, "avx2"), "avx2")
    assert avx2.has_avx2 and not avx2.has("avx512f") and not avx2.computes_bf16
    assert avx2.kernel_isa == "avx2" and avx2.kernel_isas == ("avx2",)
    assert "sse4_2" in avx2.flags  # flags no level names are kept
    avx512 = CpuFeatures(apply_mask(ZEN4, "avx512"), "avx512")
    assert avx512.kernel_isas == ("avx512", "avx2") and not avx512.has("avx512_bf16")
    assert CpuFeatures(apply_mask(ZEN4, "scalar"), "scalar").kernel_isa is None
    assert not avx2.has_vnni and avx512.has_vnni  # AVX2's level is AVX2-only CPUs': no VNNI
    avx2_vnni = CpuFeatures(apply_mask(ZEN4, "avx2_vnni"), "avx2_vnni")
    assert avx2_vnni.has_vnni and avx2_vnni.kernel_isa == "avx2"
    full = CpuFeatures(ZEN4)
    assert full.kernel_isas == ("avx512_bf16", "avx512", "avx2") and full.can_prepack_bf16


def test_a_mask_never_adds_a_feature():
    assert CpuFeatures(apply_mask(EPYC_AVX2, "avx512_bf16")).kernel_isa == "avx2"


def test_a_bad_mask_names_the_variable_and_the_levels():
    assert parse_mask(None) is None and parse_mask(" ") is None and parse_mask("AVX2") == "avx2"
    with pytest.raises(CapabilityError, match=f"{MASK_ENV}='avx3'.*avx2"):
        parse_mask("avx3")


def test_library_settings_follow_the_mask():
    assert library_env(CpuFeatures(ZEN4)) == {}
    assert library_env(CpuFeatures(apply_mask(ZEN4, "avx2"), "avx2")) == {
        "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
    assert library_env(CpuFeatures(apply_mask(ZEN4, "avx2_vnni"), "avx2_vnni"))["ONEDNN_MAX_CPU_ISA"] == "AVX2_VNNI"
    assert library_env(CpuFeatures(apply_mask(EPYC_AVX2, "avx2"), "avx2"))["ONEDNN_MAX_CPU_ISA"] == "AVX2"
    assert library_env(CpuFeatures(apply_mask(ZEN4, "scalar"), "scalar"))["ATEN_CPU_CAPABILITY"] == "default"


@pytest.mark.skipif(not cpu_features().has_avx2, reason="this CPU has no AVX2 to mask down to")
def test_importing_engine_under_the_mask_caps_torch_too():
    code = "import engine, torch; print(torch.backends.cpu.get_cpu_capability())"
    done = run_python(code, **{MASK_ENV: "avx2"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "AVX2"


def test_dtype_auto_follows_the_cpu():
    assert resolve_dtype("auto", "cpu", CpuFeatures(ZEN4))[0] == "bfloat16"
    assert resolve_dtype("auto", "cpu", CpuFeatures(EPYC_AVX2))[0] == "float32"
    assert resolve_dtype("auto", "cpu", CpuFeatures(apply_mask(ZEN4, "avx2"), "avx2"))[0] == "float32"
    assert resolve_dtype("auto", "cuda", CpuFeatures(EPYC_AVX2))[0] == "bfloat16"
    assert resolve_dtype("bfloat16", "cpu", CpuFeatures(EPYC_AVX2))[0] == "bfloat16"  # asked: kept


def test_weight_format_auto_and_its_errors():
    assert resolve_weight_format("auto", "cpu", has_native_kernels=True)[0] == "native"
    assert resolve_weight_format("auto", "cpu", has_native_kernels=False)[0] == "dequantized"
    with pytest.raises(ValueError, match="--weight-format dequantized"):
        resolve_weight_format("native", "cpu", has_native_kernels=False)


def test_a_bad_mask_is_a_one_line_error_not_a_traceback():
    done = run_python("from engine.cli import main; main(['generate', 'hi'])", **{MASK_ENV: "avx3"})
    assert done.returncode != 0
    assert f"{MASK_ENV}='avx3'" in done.stderr and "Traceback" not in done.stderr


def test_an_explicit_bf16_plan_keeps_the_dense_path_and_says_nothing_of_q8(caplog):
    """--dtype bfloat16 with auto weights: the exact kernel up to 4 rows, the bf16 copy above, and
    the logged reason names no Q8 rounding (it did once: "more than None rows")."""
    from engine.kernels.cpu import native_library
    from engine.model.compute_plan import make_compute_plan

    if native_library.load() is None:
        pytest.skip("no C++ kernels here: auto keeps no quantized blocks")
    with caplog.at_level("INFO", logger="engine.model.compute_plan"):
        plan = make_compute_plan("bfloat16", "auto", "cpu")
    assert (plan.q8_above_rows, plan.dense_above_rows) == (None, 4)
    logged = " ".join(r.getMessage() for r in caplog.records if "compute plan" in r.getMessage())
    assert "compute plan" in logged and "Q8" not in logged and "None" not in logged


def test_q8_activations_where_asked_or_where_auto_runs_fp32():
    """native stays exact (the reference), and so does an explicit fp32; native_q8, and auto where
    the auto dtype is fp32 (no bf16 dot products), round activations at every step; auto with bf16
    on a CPU with VNNI, above 4 rows (with AMX, up to 32)."""
    assert q8_rows_threshold("native") is None and q8_rows_threshold("int8") is None
    assert q8_rows_threshold("native_q8") == 0
    assert q8_rows_threshold("auto", "auto", torch.float32) == 0
    assert q8_rows_threshold("auto", "float32", torch.float32) is None
    amx = CpuFeatures(frozenset({"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq",
                                 "avx512_bf16", "avx512_vnni", "amx_bf16"}))
    no_amx = CpuFeatures(amx.flags - {"amx_bf16"})
    no_vnni = CpuFeatures(no_amx.flags - {"avx512_vnni"})
    # bf16 where it is native: Q8 above 4 rows on a CPU with VNNI; with AMX too, only up to 32
    # rows (oneDNN's bf16 tiles win past them); an explicit dtype keeps bf16 arithmetic.
    assert q8_rows_threshold("auto", "auto", torch.bfloat16, no_amx) == 4
    assert q8_rows_threshold("auto", "auto", torch.bfloat16, amx) == 4
    assert q8_rows_threshold("auto", "auto", torch.bfloat16, no_vnni) is None
    assert q8_rows_threshold("auto", "bfloat16", torch.bfloat16, no_amx) is None
    assert dense_rows_threshold("auto", torch.bfloat16, 4, amx) == 32
    assert dense_rows_threshold("auto", torch.bfloat16, 4, no_amx) is None
    assert dense_rows_threshold("auto", torch.float32, 0, amx) is None  # fp32 Q8: no bf16 copy to run
    assert dense_rows_threshold("auto", torch.bfloat16) == 4 and dense_rows_threshold("auto", torch.float32) == 16
    assert dense_rows_threshold("native_q8", torch.float32) is None
    plan = ComputePlan(device=torch.device("cpu"), dtype=torch.float32, weight_format="native", native_ops=True,
                       prepack_bf16=False, q8_above_rows=4)
    assert not plan.runs_q8(4) and plan.runs_q8(5) and plan.keeps_file_blocks
    assert plan.weights_label == "native+q8>4" and ComputePlan.reference().weights_label == "dequantized"
    assert not ComputePlan.reference().runs_q8(64)
