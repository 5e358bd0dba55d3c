"""Load a Llama-family model from a GGUF file through the `gguf` package.

Quantized tensors (Q4_0, Q4_1, Q8_0) are either kept as their blocks (`keep_quantized`: the C++
quantized linear computes on them, as llama.cpp does) or dequantized with gguf's own reference
code (the same that transformers uses) and cast to the model dtype.  llama.cpp's converter
permutes the rows of Q and K for its interleaved RoPE; we undo that so one rotate-half model
serves both formats (on blocks too: a row of blocks is one output feature).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from engine.config import ModelFileError
from engine.gguf_fields import field_value
from engine.gguf_file import GGUFFile
from engine.kernels.cpu.quantized_weights import QuantFormat, QuantizedWeight, from_blocks
from engine.model.arch import LlamaArchConfig

SUPPORTED_ARCHS = ("llama", "qwen2")
SUPPORTED_TYPES = {
    GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16,
    GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0,
}

_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def open_gguf(path: str | Path) -> GGUFFile:
    """The file, parsed once per process for each version of the file (a load reads it three
    times: the architecture, the tokenizer, the weights).  Invariant: the file is mapped
    read-only, so sharing it is safe; a rewritten file (new size or mtime) is parsed anew."""
    stat = os.stat(path)
    return _open_gguf(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _open_gguf(path: str, size: int, mtime_ns: int) -> GGUFFile:
    return GGUFFile(path)


def release_gguf_readers() -> None:
    """Drop the parsed files (the vocabulary's strings, the tensors' views of the mapping): for a
    process that has loaded the one model it will serve.  A later load parses again."""
    _open_gguf.cache_clear()


def read_arch_config(reader: GGUFFile) -> LlamaArchConfig:
    arch = field_value(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise ModelFileError(f"{reader.path}: unsupported GGUF architecture {arch!r}; supported: {SUPPORTED_ARCHS}")
    get = lambda key, default=None: field_value(reader, f"{arch}.{key}", default)  # noqa: E731
    hidden_size = int(get("embedding_length"))
    num_heads = int(get("attention.head_count"))
    tensor_names = {t.name for t in reader.tensors}
    vocab_size = get("vocab_size") or len(field_value(reader, "tokenizer.ggml.tokens"))
    return LlamaArchConfig(
        vocab_size=int(vocab_size),
        hidden_size=hidden_size,
        intermediate_size=int(get("feed_forward_length")),
        num_layers=int(get("block_count")),
        num_heads=num_heads,
        num_kv_heads=int(get("attention.head_count_kv", num_heads)),
        head_dim=int(get("attention.key_length", hidden_size // num_heads)),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_freq_factors=_rope_freq_factors(reader),
        max_position_embeddings=int(get("context_length", 4096)),
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
    )


def _rope_freq_factors(reader: GGUFFile) -> tuple[float, ...] | None:
    for tensor in reader.tensors:
        if tensor.name == "rope_freqs.weight":
            return tuple(float(x) for x in np.asarray(tensor.data, dtype=np.float32).reshape(-1))
    return None


def iter_gguf_weights(reader: GGUFFile, config: LlamaArchConfig, dtype: torch.dtype,
                      keep_quantized: bool = False) -> Iterator[tuple[str, torch.Tensor | QuantizedWeight]]:
    """Yield (HF name, weight) for every tensor, Q/K rows un-permuted for llama: a tensor in `dtype`,
    or with keep_quantized, a QuantizedWeight for each Q4_0/Q4_1/Q8_0 matrix."""
    arch = field_value(reader, "general.architecture")
    for tensor in reader.tensors:
        hf_name = _hf_name(tensor.name)
        if hf_name is None:
            continue
        if tensor.tensor_type not in SUPPORTED_TYPES:
            raise ModelFileError(f"{reader.path}: tensor {tensor.name} has unsupported type {tensor.tensor_type.name}")
        quantized = keep_quantized and tensor.tensor_type.name in QuantFormat.__members__
        array = np.asarray(tensor.data) if quantized else _to_float32(tensor)
        if arch == "llama" and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            num_heads = config.num_heads if "q_proj" in hf_name else config.num_kv_heads
            array = unpermute_qk(array, num_heads)
        if quantized:
            yield hf_name, from_blocks(array, QuantFormat.from_ggml(tensor.tensor_type))
        else:
            yield hf_name, torch.from_numpy(np.array(array, copy=True, order="C")).to(dtype)


def _to_float32(tensor) -> np.ndarray:
    """The tensor as float32 numpy, rows = GGUF's second dimension (PyTorch's [out, in])."""
    shape = tuple(int(d) for d in reversed(tensor.shape))
    if tensor.tensor_type == GGMLQuantizationType.F32:
        return np.asarray(tensor.data, dtype=np.float32).reshape(shape)
    return dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False).reshape(shape)


def unpermute_qk(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Invert llama.cpp's convert-time permutation of Q/K rows.

    The converter turned each head's rows [first half | second half] (HF's rotate-half pairs)
    into interleaved pairs [x0, y0, x1, y1, ...]; here the pairs go back to two halves.
    """
    rows = weight.shape[0]
    head_dim = rows // num_heads
    rest = weight.shape[1:]
    return (weight.reshape(num_heads, head_dim // 2, 2, *rest)
            .swapaxes(1, 2).reshape(rows, *rest))


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    if not gguf_name.startswith("blk."):
        return None
    _, index, kind, suffix = gguf_name.split(".", 3)
    if kind not in _LAYER_NAMES:
        return None
    return f"model.layers.{index}.{_LAYER_NAMES[kind]}.{suffix}"
