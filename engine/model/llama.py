"""A Llama-family decoder (Llama 2/3, SmolLM/SmolLM2, TinyLlama, Mistral, Qwen2) in plain torch.

The forward runs over one flattened batch: decode tokens and prefill chunks of many requests in
a single [num_tokens, hidden] tensor; attention is the only place sequences are told apart.
Q/K/V are one fused projection (`wqkv`) and gate/up another (`w13`), as in gpt-fast.  Each layer
hands the next its output and the residual stream separately, so that the residual add fuses
into the next norm (as in vLLM).

On a CPU with the native library (engine/kernels/cpu/) the norms, RoPE and SiLU-and-mul run as
C++ kernels that round where these torch expressions round; elsewhere the torch code runs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from engine.kernels.cpu import layer_ops
from engine.model.arch import LlamaArchConfig
from engine.worker.attention import AttentionBackend, AttentionMetadata


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """norm(x); with a residual, (norm(x + residual), x + residual).  The native path updates
        the residual tensor in place; callers use the returned one either way."""
        if x.dim() == 2 and layer_ops.usable(x):
            out = layer_ops.rms_norm(x, self.weight, self.eps, residual)
            return out if residual is None else (out, residual)
        if residual is None:
            return self._normalize(x)
        residual = x + residual
        return self._normalize(residual), residual

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        # Normalize in fp32 (as HF does), then scale in the model dtype.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class RopeTables:
    """One forward's cos and sin [T, head_dim / 2] at its tokens' positions, in the activation
    dtype (as HF does); built once per forward and shared by every layer."""

    __slots__ = ("cos", "sin", "_full")

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor) -> None:
        self.cos, self.sin = cos, sin
        self._full: tuple[torch.Tensor, torch.Tensor] | None = None

    def full(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, [-sin, sin]) as [T, 1, head_dim], what apply_rotary takes; built on first use."""
        if self._full is None:
            self._full = (torch.cat((self.cos, self.cos), dim=-1)[:, None, :],
                          torch.cat((-self.sin, self.sin), dim=-1)[:, None, :])
        return self._full


class RotaryEmbedding(nn.Module):
    """Rotate-half RoPE (HF layout) with a cos/sin table over every position."""

    def __init__(self, head_dim: int, max_positions: int, theta: float,
                 scaling: dict[str, float] | None, freq_factors: tuple[float, ...] | None) -> None:
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        if scaling is not None:
            inv_freq = _llama3_scaled_inv_freq(inv_freq, scaling)
        if freq_factors is not None:
            inv_freq = inv_freq / torch.tensor(freq_factors, dtype=torch.float64)
        angles = torch.outer(torch.arange(max_positions, dtype=torch.float64), inv_freq).float()
        self.register_buffer("cos", angles.cos(), persistent=False)  # [max_positions, head_dim/2]
        self.register_buffer("sin", angles.sin(), persistent=False)

    @classmethod
    def for_config(cls, config: LlamaArchConfig) -> RotaryEmbedding:
        return cls(config.head_dim, config.max_position_embeddings, config.rope_theta,
                   config.rope_scaling_dict, config.rope_freq_factors)

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> RopeTables:
        return RopeTables(self.cos[positions].to(dtype), self.sin[positions].to(dtype))

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """[T, 1, D] tables for apply_rotary at these positions, in the activation dtype."""
        return self.tables(positions, dtype).full()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE: [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin]; signed_sin is [-sin, sin]."""
    half = x.shape[-1] // 2
    swapped = torch.cat((x[..., half:], x[..., :half]), dim=-1)
    return x * cos + swapped * signed_sin


def _llama3_scaled_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, float]) -> torch.Tensor:
    """Llama 3.1's frequency-dependent RoPE scaling: long wavelengths are divided by `factor`,
    short ones kept, the band in between interpolated."""
    factor = scaling["factor"]
    low_freq_factor = scaling.get("low_freq_factor", 1.0)
    high_freq_factor = scaling.get("high_freq_factor", 4.0)
    original_max = scaling.get("original_max_position_embeddings", 8192)
    low_freq_wavelen = original_max / low_freq_factor
    high_freq_wavelen = original_max / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_max / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class Attention(nn.Module):
    def __init__(self, config: LlamaArchConfig, backend: AttentionBackend) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        qkv_dim = (config.num_heads + 2 * config.num_kv_heads) * config.head_dim
        self.wqkv = nn.Linear(config.hidden_size, qkv_dim, bias=config.attention_bias)
        self.wo = nn.Linear(config.num_heads * config.head_dim, config.hidden_size, bias=False)
        self.backend = backend

    def forward(self, x: torch.Tensor, rope: RopeTables, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        num_tokens = x.shape[0]
        q_dim, kv_dim = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        qkv = self.wqkv(x)
        native = layer_ops.usable(qkv)
        if native:
            # Q and K heads are adjacent in each row: one call rotates both, in place.
            query_and_key = qkv[:, : q_dim + kv_dim].view(num_tokens, self.num_heads + self.num_kv_heads, self.head_dim)
            layer_ops.rotary_embedding_(query_and_key, rope.cos, rope.sin)
        q, k, v = qkv.split([q_dim, kv_dim, kv_dim], dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        if not native:
            q, k = apply_rotary(q, *rope.full()), apply_rotary(k, *rope.full())
        out = self.backend.forward(q, k, v, kv_cache, meta)
        return self.wo(out.view(num_tokens, q_dim))


class FeedForward(nn.Module):
    def __init__(self, config: LlamaArchConfig) -> None:
        super().__init__()
        self.w13 = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.w2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.w13(x)
        if layer_ops.usable(gate_up):
            return self.w2(layer_ops.silu_and_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaArchConfig, backend: AttentionBackend) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention = Attention(config, backend)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.feed_forward = FeedForward(config)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, rope: RopeTables,
                kv_cache: torch.Tensor, meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, residual) -> (this layer's FFN output, the residual stream before it); the stream
        is x + residual, and just x for the first layer."""
        if residual is None:
            residual, h = x, self.attention_norm(x)
        else:
            h, residual = self.attention_norm(x, residual)
        h = self.attention(h, rope, kv_cache, meta)
        h, residual = self.ffn_norm(h, residual)
        return self.feed_forward(h), residual


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: LlamaArchConfig, backend: AttentionBackend) -> None:
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, backend) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.output = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.rotary = RotaryEmbedding.for_config(config)
        self.requires_grad_(False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions [num_tokens] -> final hidden states [num_tokens, hidden]."""
        x = self.tok_embeddings(input_ids)
        rope = self.rotary.tables(positions, x.dtype)
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches):
            x, residual = layer(x, residual, rope, kv_cache, meta)
        return self.norm(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Only the rows that sample this step come here; logits are fp32."""
        return self.output(hidden).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors in, fusing q/k/v into wqkv and gate/up into w13."""
        params = dict(self.named_parameters())
        pending: dict[str, dict[str, torch.Tensor]] = {}
        loaded: set[str] = set()
        for hf_name, tensor in weights:
            name, part = _our_name(hf_name)
            if name is None:
                continue
            if part is None:
                params[name].data.copy_(tensor)
                loaded.add(name)
                continue
            parts = pending.setdefault(name, {})
            parts[part] = tensor
            order = _FUSED_ORDER[name.split(".", 2)[2]]  # "layers.N.<key>"
            if set(order) <= parts.keys():
                params[name].data.copy_(torch.cat([parts[p] for p in order], dim=0))
                loaded.add(name)
                del pending[name]
        self._check_all_loaded(params, loaded)

    def _check_all_loaded(self, params: dict[str, nn.Parameter], loaded: set[str]) -> None:
        if self.config.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight  # re-tie: to_empty() splits shared params
            loaded.add("output.weight")
        elif "output.weight" not in loaded and "tok_embeddings.weight" in loaded:
            # Checkpoints that tie without saying so ship no lm_head: reuse the embedding.
            self.output.weight = self.tok_embeddings.weight
            loaded.add("output.weight")
        missing = sorted(set(params) - loaded)
        if missing:
            raise ValueError(f"checkpoint is missing weights: {missing[:8]}")


# HF parameter names -> ours; fused targets record which slice they fill, in concatenation order.
_FUSED_ORDER = {
    "attention.wqkv.weight": ("q", "k", "v"),
    "attention.wqkv.bias": ("q", "k", "v"),
    "feed_forward.w13.weight": ("gate", "up"),
}
_LAYER_NAMES = {
    "input_layernorm.weight": ("attention_norm.weight", None),
    "post_attention_layernorm.weight": ("ffn_norm.weight", None),
    "self_attn.q_proj.weight": ("attention.wqkv.weight", "q"),
    "self_attn.k_proj.weight": ("attention.wqkv.weight", "k"),
    "self_attn.v_proj.weight": ("attention.wqkv.weight", "v"),
    "self_attn.q_proj.bias": ("attention.wqkv.bias", "q"),
    "self_attn.k_proj.bias": ("attention.wqkv.bias", "k"),
    "self_attn.v_proj.bias": ("attention.wqkv.bias", "v"),
    "self_attn.o_proj.weight": ("attention.wo.weight", None),
    "mlp.gate_proj.weight": ("feed_forward.w13.weight", "gate"),
    "mlp.up_proj.weight": ("feed_forward.w13.weight", "up"),
    "mlp.down_proj.weight": ("feed_forward.w2.weight", None),
}
_TOP_NAMES = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}


def _our_name(hf_name: str) -> tuple[str | None, str | None]:
    if hf_name in _TOP_NAMES:
        return _TOP_NAMES[hf_name], None
    if hf_name.startswith("model.layers."):
        index, rest = hf_name[len("model.layers."):].split(".", 1)
        if rest in _LAYER_NAMES:
            name, part = _LAYER_NAMES[rest]
            return f"layers.{index}.{name}", part
    return None, None  # rotary inv_freq buffers and the like
