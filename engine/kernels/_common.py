"""What the kernel files share: argument checks for the wrappers, and GPU-faithful interpreter helpers.

Each wrapper validates its arguments before launch and raises ValueError with a message a caller
can act on; a bad launch would otherwise read or write out of bounds on the GPU without a word.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.kv_cache_format import head_dim_of

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_ndim(name: str, tensor: torch.Tensor, ndim: int, shape_doc: str) -> None:
    if tensor.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {shape_doc}, got shape {tuple(tensor.shape)}")


def check_dtype(name: str, tensor: torch.Tensor, dtypes: tuple[torch.dtype, ...]) -> None:
    if tensor.dtype not in dtypes:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"{name} must have dtype in ({allowed}), got {tensor.dtype}")


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"all tensors must be on one device, got {devices}")


def check_last_dim_contiguous(name: str, tensor: torch.Tensor) -> None:
    if tensor.shape[-1] > 1 and tensor.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension (stride 1), "
                         f"got strides {tensor.stride()}")


def check_contiguous(name: str, tensor: torch.Tensor) -> None:
    if not tensor.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got shape {tuple(tensor.shape)} "
                         f"strides {tensor.stride()}; call .contiguous() first")


def check_kv_cache(kv_cache: torch.Tensor, num_kv_heads: int | None = None,
                   head_dim: int | None = None) -> None:
    """kv_cache: [2, num_blocks, block_size, num_kv_heads, head_dim] (int8: head_dim + 4, see
    kv_cache_format.py), last dim contiguous."""
    check_ndim("kv_cache", kv_cache, 5, "[2, num_blocks, block_size, num_kv_heads, head_dim]")
    if kv_cache.shape[0] != 2:
        raise ValueError(f"kv_cache dim 0 must be 2 (K, V), got shape {tuple(kv_cache.shape)}")
    if num_kv_heads is not None and kv_cache.shape[3] != num_kv_heads:
        raise ValueError(f"kv_cache has {kv_cache.shape[3]} KV heads, the keys have {num_kv_heads}")
    if head_dim is not None and head_dim_of(kv_cache) != head_dim:
        raise ValueError(f"kv_cache head_dim is {head_dim_of(kv_cache)}, the query's is {head_dim}")
    check_dtype("kv_cache", kv_cache, FLOAT_DTYPES + (torch.int8,))
    check_last_dim_contiguous("kv_cache", kv_cache)


def is_interpreted(kernel: object) -> bool:
    """True when TRITON_INTERPRET=1 was set as the kernel's module was imported."""
    return not isinstance(kernel, triton.runtime.JITFunction)


def check_launchable(kernel: object, device: torch.device) -> None:
    """Compiled kernels need CUDA tensors; CPU tensors run only in the interpreter."""
    if device.type != "cuda" and not is_interpreted(kernel):
        raise ValueError(f"Triton kernels need CUDA tensors, got {device}; to run them on CPU (slowly, for "
                         "tests) set TRITON_INTERPRET=1 before engine.kernels is imported")


def num_stages_for(dtype: torch.dtype) -> int:
    """Software-pipelining depth for a K loop: 3 buffers of 16-bit tiles, but only 2 of fp32 ones,
    so the kernels stay inside the ~100 KB of shared memory of consumer GPUs (sm_86/sm_89)."""
    return 2 if dtype == torch.float32 else 3


# Triton 3.9's interpreter (TRITON_INTERPRET=1) keeps bf16 as raw uint16 bits, which breaks two
# things the GPU does right: tl.dot multiplies the raw integers, and fp32 -> bf16 truncates
# instead of rounding to nearest even. Under INTERPRETED=True (is_interpreted(kernel) at launch)
# the helpers below do what the GPU does; on a GPU they compile to a plain tl.dot / .to().

@triton.jit
def mma(a, b, INTERPRETED: tl.constexpr):
    """tl.dot(a, b) with fp32 accumulation. "ieee" keeps fp32 operands exact (not tf32) and is
    accepted by every backend; 16-bit operands ignore it. bf16 x bf16 products are exact in fp32,
    so the interpreter's upcast gives the tensor cores' result."""
    if INTERPRETED:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def load_kv_tile(base, row_offsets, dims, valid, head_dim, dtype: tl.constexpr, QUANTIZED: tl.constexpr,
                 INTERPRETED: tl.constexpr):
    """[N, BLOCK_D] K or V rows at base + row_offsets (cache elements), zeros where not `valid`:
    as stored, or for an int8 cache (QUANTIZED) each row's values times its scale, rounded once
    to `dtype` (torch's dequantize_rows in kv_cache_format.py likewise)."""
    mask = valid[:, None] & (dims[None, :] < head_dim)
    x = tl.load(base + row_offsets[:, None] + dims[None, :], mask=mask, other=0)
    if QUANTIZED:
        scale_ptrs = (base + row_offsets + head_dim).to(tl.pointer_type(tl.float32), bitcast=True)
        scale = tl.load(scale_ptrs, mask=valid, other=0.0)
        x = cast_to(x.to(tl.float32) * scale[:, None], dtype, INTERPRETED)
    return x


@triton.jit
def cast_to(x, dtype: tl.constexpr, INTERPRETED: tl.constexpr):
    """x.to(dtype), rounding fp32 -> bf16 to nearest even under the interpreter too."""
    if INTERPRETED:
        if dtype == tl.bfloat16:
            bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)
