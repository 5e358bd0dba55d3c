"""C++ kernels for x86 CPUs with AVX-512, built on first use (native_library.py) and called
through ctypes; on other machines the engine keeps its torch path.

    simd.h                              loads, stores and rounding of fp32/bf16/fp16 lanes, exp
    paged_decode_attention.cpp / .py    decode attention read in place from the paged KV cache
    native_backend.py                   the attention backend: these decodes, torch prefill
    rms_norm.cpp                        RMSNorm, fused with the residual add before it
    rotary.cpp                          RoPE on the Q and K heads of the fused QKV output, in place
    silu_and_mul.cpp                    SwiGLU activation of the fused gate/up output
    layer_ops.py                        wrappers for the three element-wise kernels
"""
