"""Triton kernels for the engine's hot paths, one file per kernel: the `@triton.jit` kernel, a
wrapper that validates arguments before launch, and a plain torch reference with the same contract.

    kv_cache_write.py           K/V rows into the paged cache through slot_mapping
    paged_decode_attention.py   flash-decoding over the paged cache, GQA-grouped, split + merge
    paged_prefill_attention.py  ragged chunked-prefill attention, one launch per batch
    rms_norm.py                 RMSNorm, optionally fused with the residual add
    rotary.py                   rotate-half RoPE on Q and K, in place
    gemv.py                     decode GEMV (M <= 16), bf16/fp16/fp32 or int8 weight-only
    elastic_gemm.py             per-segment prefix-width GEMM for elastic submodels
    kv_cache_format.py          the KV cache's rows: the model's dtype, or int8 with a scale (torch)

The attention backend built on these kernels is engine/model/attention_backends/triton_backend.py.

Tests run them on CPU in Triton's interpreter (TRITON_INTERPRET=1, see tests/kernels/conftest.py).
cpu/ holds the C++ kernels the CPU path runs (see cpu/__init__.py).
"""
