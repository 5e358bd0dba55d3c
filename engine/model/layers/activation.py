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

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        """[T, 2n] (gate, then up) -> [T, n]."""
        if self.native:
            return layer_ops.silu_and_mul(gate_up)
        return silu_and_mul_reference(gate_up)

    __call__ = forward  # PERF: skips nn.Module.__call__, see engine/model/layers/__init__.py


def silu_and_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
