"""SwiGLU: silu(gate) * up over the fused gate/up projection's output."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.kernels.cpu import layer_ops
from engine.model.compute_plan import ComputePlan


class SiluAndMul(nn.Module):
    def __init__(self, plan: ComputePlan) -> None:
        super().__init__()
        self.native = plan.native_ops

    def forward(self, gate_up: torch.Tensor, n: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """[T, 2n] (gate, then up; wider rows: columns past 2n are not read) -> [T, n], into
        `out` if given (rows may be strided).  n defaults to half of gate_up's width."""
        if self.native:
            return layer_ops.silu_and_mul(gate_up, n, out)
        return silu_and_mul_reference(gate_up, n, out)

    __call__ = forward  # PERF: skips nn.Module.__call__, see engine/model/layers/__init__.py


def silu_and_mul_reference(gate_up: torch.Tensor, n: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    n = gate_up.shape[-1] // 2 if n is None else n
    result = F.silu(gate_up[..., :n]) * gate_up[..., n:2 * n]
    return result if out is None else out.copy_(result)
