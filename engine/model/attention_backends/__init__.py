"""Every attention backend, behind one protocol (metadata.py), and the one place that picks one.

    metadata.py            AttentionMetadata (one step's batch, shared by every layer), the protocol
    torch_backend.py       the torch path: the reference, and the CPU fallback
    native_cpu_backend.py  decodes through the C++ kernel read in place from the paged cache
    triton_backend.py      the Triton kernels, for CUDA tensors
"""

from __future__ import annotations

from engine.model.attention_backends.metadata import AttentionBackend, AttentionMetadata
from engine.model.attention_backends.torch_backend import TorchAttentionBackend

__all__ = ["AttentionBackend", "AttentionMetadata", "TorchAttentionBackend", "make_attention_backend"]


def make_attention_backend(name: str, device: str) -> AttentionBackend:
    """auto: the Triton kernels on CUDA, the C++ decode kernel on CPU where it builds (else the
    torch path); triton on CPU runs the Triton interpreter (set TRITON_INTERPRET=1), for tests."""
    if name == "triton" or (name == "auto" and device.startswith("cuda")):
        from engine.model.attention_backends.triton_backend import TritonAttentionBackend
        return TritonAttentionBackend()
    if name == "native" or (name == "auto" and device == "cpu"):
        from engine.kernels.cpu import native_library
        from engine.model.attention_backends.native_cpu_backend import NativeCpuAttentionBackend
        if name == "native" and native_library.load() is None:
            raise RuntimeError("attention_backend='native' needs the C++ CPU kernels, which could not be "
                               "built or loaded here (see the log); use 'auto' or 'torch'")
        return NativeCpuAttentionBackend()
    return TorchAttentionBackend()
