"""Rotate-half RoPE (Hugging Face layout) with a cos/sin table over every position, Llama 3.1's
frequency scaling and GGUF's per-frequency factors."""

from __future__ import annotations

import math

import torch
from torch import nn

from engine.model.arch import LlamaArchConfig


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
        # The tables are computed on the CPU in fp64 whatever the default device, then moved to
        # it: the same numbers on every device, and no meta-device arithmetic (the loader builds
        # the model on the meta device, where arange runs through torch's Python references,
        # which import torch._dynamo and with it Triton: ~3 s of a CPU server's start-up and
        # nanobind's leak report when it exits).
        device = torch.get_default_device()
        with torch.device("cpu"):
            inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
            if scaling is not None:
                inv_freq = _llama3_scaled_inv_freq(inv_freq, scaling)
            if freq_factors is not None:
                inv_freq = inv_freq / torch.tensor(freq_factors, dtype=torch.float64)
            angles = torch.outer(torch.arange(max_positions, dtype=torch.float64), inv_freq).float()
        self.register_buffer("cos", angles.cos().to(device), persistent=False)  # [max_positions, head_dim/2]
        self.register_buffer("sin", angles.sin().to(device), persistent=False)

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
