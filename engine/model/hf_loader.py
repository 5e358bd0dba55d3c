"""Load a Llama-family model from a Hugging Face directory (config.json + *.safetensors)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from engine.config import ModelFileError
from engine.model.arch import LlamaArchConfig

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


def read_hf_config(model_dir: Path) -> dict:
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise ModelFileError(f"{model_dir} has no config.json; expected a Hugging Face model directory")
    return json.loads(config_path.read_text())


def arch_config_from_hf(hf: dict) -> LlamaArchConfig:
    architectures = hf.get("architectures") or []
    if not any(a in SUPPORTED_ARCHITECTURES for a in architectures):
        raise ModelFileError(f"unsupported architectures {architectures}; supported: {SUPPORTED_ARCHITECTURES}")
    num_heads = hf["num_attention_heads"]
    is_qwen2 = "Qwen2ForCausalLM" in architectures
    return LlamaArchConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=hf.get("rope_theta", 10000.0),
        rope_scaling=_llama3_rope_scaling(hf.get("rope_scaling")),
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=is_qwen2 or bool(hf.get("attention_bias", False)),
    )


def _llama3_rope_scaling(scaling: dict | None) -> tuple[tuple[str, float], ...] | None:
    if not scaling:
        return None
    kind = scaling.get("rope_type") or scaling.get("type")
    if kind == "default":
        return None
    if kind != "llama3":
        raise ModelFileError(f"unsupported rope_scaling type {kind!r}; supported: llama3")
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    return tuple((k, float(scaling[k])) for k in keys if k in scaling)


def iter_safetensors_weights(model_dir: Path, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelFileError(f"{model_dir} has no *.safetensors weights")
    for path in files:
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name).to(dtype)
