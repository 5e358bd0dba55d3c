"""How the model computes on this machine, decided once at load: the activation/KV dtype, the
weight format, whether the C++ element-wise kernels and oneDNN prepacking run.

Every choice asks the one capability probe (engine/capabilities.py) and is logged with its
reason.  The layers (engine/model/layers/) read this plan and nothing else to pick their
kernels; the model file never does.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from engine.capabilities import CpuFeatures, cpu_features
from engine.config import WEIGHT_FORMATS
from engine.kernels.cpu import native_library
from engine.kernels.cpu.native_library import DTYPE_CODES

logger = logging.getLogger(__name__)

TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
# Weight formats the quantized C++ linears run: GGUF's own blocks, and int8 for float checkpoints.
QUANTIZED_FORMATS = ("native", "native_q8", "int8")
FILE_BLOCK_FORMATS = ("native", "native_q8")  # keep a GGUF file's blocks as they are


@dataclass(frozen=True)
class ComputePlan:
    """What every layer of one loaded model computes with.

    Invariant: `native_ops` and a quantized `weight_format` are only set where the C++ library
    loaded for this CPU; `prepack_bf16` only where the probe says oneDNN can prepack bf16.
    """

    device: torch.device
    dtype: torch.dtype  # activations and KV cache; dense weights are stored in it too
    weight_format: str  # "dequantized", "native" (the file's quantized blocks) or "int8"
    native_ops: bool  # RMSNorm, RoPE, SiLU-and-mul as C++ kernels
    prepack_bf16: bool  # dense bf16 weights prepacked for oneDNN once at load
    # Quantized weights also keep a dense copy, used by steps of more rows than this (None: the
    # quantized kernel for every step).  Chosen by weight_format auto; see resolve_weight_format.
    dense_above_rows: int | None = None
    # Quantized weights run through the Q8-activation kernel (quantized_linear_q8: activations
    # rounded to 8-bit blocks, integer dot products) for steps of more rows than this, and
    # through the exact fp32 kernel up to it (None: the exact kernel always, the reference).
    q8_above_rows: int | None = None

    @classmethod
    def reference(cls, dtype: torch.dtype = torch.float32, device: str = "cpu") -> ComputePlan:
        """The torch path everywhere: dense weights, no C++ ops, no prepacking (tests' reference)."""
        return cls(device=torch.device(device), dtype=dtype, weight_format="dequantized", native_ops=False,
                   prepack_bf16=False)

    @property
    def quantized(self) -> bool:
        return self.weight_format in QUANTIZED_FORMATS

    @property
    def keeps_file_blocks(self) -> bool:
        return self.weight_format in FILE_BLOCK_FORMATS

    @property
    def weights_label(self) -> str:
        """The weight format and, where activations are rounded to Q8, from how many rows: one token
        for log lines and reports ("native", "native+q8", "native+q8>4")."""
        if self.q8_above_rows is None:
            return self.weight_format
        return f"{self.weight_format}+q8" + (f">{self.q8_above_rows}" if self.q8_above_rows else "")

    def runs_q8(self, num_rows: int) -> bool:
        """Whether a step of num_rows rows runs quantized weights with Q8 activations."""
        return self.q8_above_rows is not None and num_rows > self.q8_above_rows


def resolve_dtype(requested: str, device: str, features: CpuFeatures | None = None) -> tuple[str, str]:
    """(dtype name, why): "auto" becomes the fastest correct activation/KV dtype for the device."""
    if requested != "auto":
        return requested, "as asked"
    if device.startswith("cuda"):
        return "bfloat16", "CUDA computes bf16 natively"
    features = features or cpu_features()
    if features.computes_bf16 and features.can_prepack_bf16:
        return "bfloat16", "the CPU has bf16 dot products (AVX512-BF16/AMX) and oneDNN prepacks bf16"
    return "float32", ("the CPU has no bf16 dot products: bf16 GEMMs would convert every operand, and "
                       "fp32 measured faster here")


def resolve_weight_format(requested: str, device: str, has_native_kernels: bool) -> tuple[str, str]:
    """(weight format, why).  "auto": the file's quantized blocks through the C++ linear on a CPU
    where it runs (decode is memory-bound: Q4 reads a quarter of bf16's bytes), else dequantized;
    on a CPU, auto also keeps a dense copy for large steps (`dense_rows_threshold`)."""
    if requested not in WEIGHT_FORMATS:
        raise ValueError(f"weight_format must be one of {WEIGHT_FORMATS}, got {requested!r}")
    if requested in QUANTIZED_FORMATS and not (device == "cpu" and has_native_kernels):
        raise ValueError(f"weight_format={requested!r} needs the C++ CPU kernels, which this machine cannot run "
                         "(see the log); use --weight-format dequantized")
    if requested != "auto":
        return requested, "as asked"
    if device == "cpu" and has_native_kernels:
        return "native", "the C++ quantized linear runs on this CPU"
    return "dequantized", "no C++ quantized linear here"


def dense_rows_threshold(requested_format: str, dtype: torch.dtype, q8_above_rows: int | None = None,
                         features: CpuFeatures | None = None) -> int | None:
    """Rows above which a quantized weight's dense copy runs instead, for weight_format auto
    (`q8_above_rows`: the plan's, from q8_rows_threshold).

    PERF, benchmarks/quantized_linear.py on the 2-core AMD EPYC (2 threads, model shapes): with
    AVX512-BF16, the quantized kernel beats prepacked bf16 up to 2-4 rows (0.74x at 1 row) and
    loses 2.1-2.6x from 8 rows; on the AVX2 build against MKL's fp32 it wins up to ~16 rows
    (0.2-0.5x at 1-4 rows) and loses 1.3-1.4x at 32-64.  (native_q8's kernel beats MKL's fp32 at
    every size from 4 to 512 rows and needs no dense copy: benchmarks/README.md.)

    With Q8 activations the dense copy stays only where oneDNN has AMX bf16 tiles, for steps past
    32 rows: in the engine's own steps on a 2-vCPU Xeon with AMX (SmolLM2, elastic), Q8 ran decode
    steps of 5 / 8 / 16 / 32 rows in 14.4 / 17.3 / 24.5 / 38.1 ms against 25.8 / 26.7 / 32.0 /
    43.2 ms on prepacked bf16, a 32-token prefill as fast (29.7 / 29.6 ms) and a 64-token one
    slower (45.2 / 35.4 ms).  (The kernel benchmark alone, its weights cycled through 64 MiB,
    had bf16 ahead from 8 rows: inside a step each oneDNN call costs ~100 us, not its ~50.)
    """
    if requested_format != "auto":
        return None
    if q8_above_rows is None:
        return 4 if dtype == torch.bfloat16 else 16
    features = features or cpu_features()
    return 32 if dtype == torch.bfloat16 and features.has("amx_bf16") else None


def q8_rows_threshold(requested_format: str, requested_dtype: str = "float32",
                      dtype: torch.dtype = torch.float32, features: CpuFeatures | None = None) -> int | None:
    """Rows above which quantized weights run with Q8 activations (quantized_linear_q8), or None.

    native_q8 asks for it at every row count (0).  auto, where the dtype too was left to auto:
      - fp32 came out (a CPU without bf16 dot products: AVX2, or AVX-512 without BF16): every row
        count.  The Q8 kernel runs 1-4 rows as a row-major GEMV and more through its panel, and
        beats the exact fp32 kernel at every size (AVX2 build, 2 threads, the model's shapes:
        1.1-1.6x at 1 row, the LM head 1.5x; 1.0-1.35x at 2-4 rows; 1.8-2.6x at 8), and MKL's
        fp32 above 16 rows 1.7-3x (benchmarks/quantized_linear.py).
      - bf16 came out on a CPU with VNNI (AVX512-BF16 alone, as AMD's Zen 4, or with AMX): above 4
        rows, in place of oneDNN's prepacked bf16, which Q8 with VNNI beats 1.1-1.5x at 8-64 rows
        there (64 sequences x 512 of context: 1,075 against 963 output tok/s, same session); up to
        4 rows the exact kernel stays (as fast, and exact).  With AMX as well, the same up to 32
        rows, and oneDNN's bf16 tiles past them (dense_rows_threshold: Q8 0.6-0.7x at 64).  An
        elastic model's levels then run as column tiles over the blocks, the down projection
        re-blocked as Q8_0 in importance order (engine/model/layers/linear.py), decode steps as
        one C++ call a layer: 16 and 32 rows at 1.2x the tok/s of its bf16 level slices at level
        40 and 1.5-1.6x at the full level (benchmarks/README.md, "Elastic levels over Q8 blocks").

    Why auto may round activations: it is what auto already does where bf16 is native (bf16
    activations), and moves the numbers as much (fp32 against the dequantized model: perplexity
    1.0028x; 11 of 32 32-token greedy continuations identical, bf16's 12), and it is llama.cpp's
    own arithmetic.  An explicit `--dtype` keeps the exact kernel and the dense path, as do native
    and int8 (the exact kernel is the native path's greedy-agreement reference).
    """
    if requested_format == "native_q8":
        return 0
    if requested_format != "auto" or requested_dtype != "auto":
        return None
    if dtype == torch.float32:
        return 0
    features = features or cpu_features()
    if dtype == torch.bfloat16 and features.has_vnni:
        return 4
    return None


def log_plan(plan: ComputePlan, reasons: dict[str, str], kernel_build: str | None) -> None:
    weights = plan.weight_format
    if plan.q8_above_rows is not None:
        weights += (", Q8 activations" if plan.q8_above_rows == 0 else
                    f", Q8 activations above {plan.q8_above_rows} rows a step")
        weights += " (VNNI)" if cpu_features().has_vnni else ""
    if plan.dense_above_rows is not None:
        weights += f", up to {plan.dense_above_rows} rows a step, dense above"
    logger.info("compute plan: dtype=%s (%s), weights=%s (%s), C++ kernels=%s, C++ layer ops=%s, "
                "bf16 prepacking=%s", str(plan.dtype).removeprefix("torch."), reasons["dtype"], weights,
                reasons["weight_format"], kernel_build or "none (torch path)", plan.native_ops, plan.prepack_bf16)


def make_compute_plan(dtype: str, weight_format: str, device_name: str) -> ComputePlan:
    """Every kernel and format choice, from the capability probe, logged once with its reasons.
    An elastic model's levels run views of its weights; a prepacked weight has none, so its
    elastic layers keep the dense form too (engine/model/layers/linear.py)."""
    device = torch.device(device_name)
    has_native = device.type == "cpu" and native_library.load() is not None
    dtype_name, dtype_reason = resolve_dtype(dtype, device_name)
    format_name, format_reason = resolve_weight_format(weight_format, device_name, has_native)
    torch_dtype = TORCH_DTYPES[dtype_name]
    prepack = device.type == "cpu" and torch_dtype == torch.bfloat16 and _can_prepack_bf16()
    if dtype == "bfloat16" and device.type == "cpu" and not prepack:
        logger.warning("dtype bfloat16 on a CPU that oneDNN cannot prepack bf16 for (no AVX-512 BW/VL/DQ or "
                       "AVX-NE-CONVERT): running unprepacked, slowly; --dtype auto picks the fast dtype")
    file_blocks = format_name in FILE_BLOCK_FORMATS
    q8_above_rows = q8_rows_threshold(weight_format, dtype, torch_dtype) if file_blocks else None
    # Q8 beats MKL's fp32 at every size from 4 rows up, so a Q8 plan keeps a dense copy only
    # where oneDNN's AMX tiles overtake it (dense_rows_threshold).
    dense_above_rows = dense_rows_threshold(weight_format, torch_dtype, q8_above_rows) if file_blocks else None
    if weight_format == "auto" and q8_above_rows == 0:
        format_reason += ("; no bf16 dot products here, so activations are rounded to Q8 blocks "
                          "(integer dot products, 1.1-3x the fp32 kernels'); --dtype float32 keeps fp32 arithmetic")
    elif weight_format == "auto" and q8_above_rows is not None and dense_above_rows is not None:
        format_reason += (f"; VNNI here, so steps of more than {q8_above_rows} rows round activations to Q8 blocks "
                          f"(1.1-1.8x oneDNN's bf16 in steps of up to {dense_above_rows} rows), and AMX, so larger "
                          "steps run the bf16 copy; --dtype bfloat16 keeps bf16 arithmetic")
    elif weight_format == "auto" and q8_above_rows is not None:
        format_reason += ("; VNNI and no AMX here, so steps of more than 4 rows round activations to Q8 blocks "
                          "(1.1-1.5x oneDNN's bf16); --dtype bfloat16 keeps bf16 arithmetic")
    plan = ComputePlan(device=device, dtype=torch_dtype, weight_format=format_name,
                       native_ops=has_native and torch_dtype in DTYPE_CODES, prepack_bf16=prepack,
                       dense_above_rows=dense_above_rows, q8_above_rows=q8_above_rows)
    log_plan(plan, {"dtype": dtype_reason, "weight_format": format_reason},
             native_library.active_isa() if device.type == "cpu" else None)
    return plan


def _can_prepack_bf16() -> bool:
    return (cpu_features().can_prepack_bf16 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))
