"""How K and V rows lie in the paged cache: in the model's dtype (`auto`), or as int8 with one
scale per row (`int8`, vLLM's `--kv-cache-dtype`, llama.cpp's `--cache-type-k q8_0` likewise).

kv_cache[layer]: [2, num_blocks, block_size, num_kv_heads, row] (0 = K, 1 = V), where a row is
one (slot, KV head)'s head_dim values:
  auto: head_dim elements of the model dtype;
  int8: head_dim + 4 bytes, the values q then the row's fp32 scale s (x86's byte order), the
        row meaning q * s, with s = max|x| / 127 and q = round(x / s) (halves to even) in
        [-127, 127].  The C++ paths (cpu/paged_decode_attention.cpp, cpu/decode_layer.cpp) and
        the Triton kernels (kv_cache_write.py, paged_*_attention.py) read and write the same
        bytes, and quantize as quantize_rows does.

Why int8: decode attention reads every K/V row of every running request at every layer, and on
a CPU those reads come from memory: about a quarter of a 32-row decode step at 256 tokens of
context (benchmarks/README.md, #13).  An int8 row is 68 bytes where bf16's is 128.  A per-row
scale keeps each row's relative error near 1/254 of its largest value: a row's values share a
magnitude far more than a whole head's over all tokens does (fp8 e4m3 would keep 3 mantissa bits).

The scale lives in the row, not in a tensor beside the cache, so one tensor per layer still is
the layer's KV: every path that hands a cache on (block tables, tensor-parallel shards, the
fused decode layer's pointers) stays as it is.
"""

from __future__ import annotations

import torch

SCALE_BYTES = 4  # the fp32 scale ending an int8 row
INT8_MAX = 127


def row_size(head_dim: int, kv_cache_dtype: str) -> int:
    """Elements of a cache row (the cache tensor's last dimension)."""
    return head_dim + SCALE_BYTES if kv_cache_dtype == "int8" else head_dim


def storage_dtype(model_dtype: torch.dtype, kv_cache_dtype: str) -> torch.dtype:
    return torch.int8 if kv_cache_dtype == "int8" else model_dtype


def bytes_per_row(head_dim: int, model_dtype: torch.dtype, kv_cache_dtype: str) -> int:
    return row_size(head_dim, kv_cache_dtype) * storage_dtype(model_dtype, kv_cache_dtype).itemsize


def is_int8(kv_cache: torch.Tensor) -> bool:
    return kv_cache.dtype == torch.int8


def head_dim_of(kv_cache: torch.Tensor) -> int:
    """head_dim of a cache (or of any view whose last dimension is a whole row)."""
    return kv_cache.shape[-1] - SCALE_BYTES if is_int8(kv_cache) else kv_cache.shape[-1]


def quantize_rows(rows: torch.Tensor) -> torch.Tensor:
    """rows [..., D] (any float dtype) -> int8 cache rows [..., D + 4]."""
    x = rows.float()
    scale = x.abs().amax(dim=-1, keepdim=True) / INT8_MAX
    # A zero row keeps a zero scale and zero values (0 / 0 would be NaN).
    q = torch.where(scale > 0, x / torch.where(scale > 0, scale, 1.0), 0.0).round_().clamp_(-INT8_MAX, INT8_MAX)
    packed = torch.empty(*rows.shape[:-1], rows.shape[-1] + SCALE_BYTES, dtype=torch.int8, device=rows.device)
    packed[..., : rows.shape[-1]] = q.to(torch.int8)
    packed[..., rows.shape[-1]:] = scale.contiguous().view(torch.int8)
    return packed


def dequantize_rows(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int8 cache rows [..., D + 4] -> [..., D] in `dtype` (q * s in fp32, then rounded once)."""
    head_dim = rows.shape[-1] - SCALE_BYTES
    scale = rows[..., head_dim:].contiguous().view(torch.float32)  # [..., 1]
    return (rows[..., :head_dim].float() * scale).to(dtype)


def to_cache_rows(rows: torch.Tensor, kv_cache: torch.Tensor) -> torch.Tensor:
    """K or V rows [..., D] in the cache's format."""
    return quantize_rows(rows) if is_int8(kv_cache) else rows.to(kv_cache.dtype)


def from_cache_rows(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows read from a cache (either format) as [..., D] in `dtype`."""
    return dequantize_rows(rows, dtype) if is_int8(rows) else rows.to(dtype)
