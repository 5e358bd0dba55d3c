"""oneDNN-prepacked linear layers for the CPU bf16 path.

PERF: F.linear re-lays-out the weight for oneDNN on every call.  Packing once at load time made
the model's GEMMs 15-45% faster here at 64 rows (e.g. the 576 -> 3072 gate/up projection: 0.43 ->
0.28 ms) with bit-identical results.  Used only where oneDNN and its linear ops are available.
"""

from __future__ import annotations

import torch
from torch import nn


def can_prepack(device: torch.device, dtype: torch.dtype) -> bool:
    return (device.type == "cpu" and dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


class PrepackedLinear(nn.Module):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("packed_weight", torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")


def prepack_linears(model: nn.Module) -> int:
    """Swap every nn.Linear in the model for a PrepackedLinear; returns how many were swapped."""
    swaps = [(parent, name, child) for parent in model.modules()
             for name, child in parent.named_children() if isinstance(child, nn.Linear)]
    for parent, name, child in swaps:
        setattr(parent, name, PrepackedLinear(child))
    return len(swaps)
