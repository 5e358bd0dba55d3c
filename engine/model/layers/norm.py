"""RMSNorm with Hugging Face Llama's numerics, optionally fused with the residual add before it."""

from __future__ import annotations

import torch
from torch import nn

from engine.kernels.cpu import layer_ops
from engine.model.compute_plan import ComputePlan


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, plan: ComputePlan) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.native = plan.native_ops

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """norm(x); with a residual, (norm(x + residual), x + residual).  The native path updates
        the residual tensor in place; callers use the returned one either way."""
        if self.native and x.dim() == 2:
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

    __call__ = forward  # PERF: skips nn.Module.__call__, see engine/model/layers/__init__.py
