"""C++ kernels for x86 CPUs, built on first use (native_library.py) and called through ctypes:
one library per ISA build (avx512_bf16, avx512, avx2), the engine loading the best its CPU runs
(engine/capabilities.py); on other machines the engine keeps its torch path.  The attention
backend that uses the decode kernel is engine/model/attention_backends/native_cpu_backend.py.

    native_library.py                   builds, caches and loads each build; which one is in use
    simd.h                              the vector of fp32 lanes each build has (16 or 8): loads,
                                        stores and rounding of fp32/bf16/fp16, exp, sums
    paged_decode_attention.cpp / .py    decode attention read in place from the paged KV cache
    rms_norm.cpp                        RMSNorm, fused with the residual add before it
    rotary.cpp                          RoPE on the Q and K heads of the fused QKV output, in place
    silu_and_mul.cpp                    SwiGLU activation of the fused gate/up output
    layer_ops.py                        wrappers for the three element-wise kernels
    quantized_linear.cpp / .py          y = x W^T with W kept as GGUF quantization blocks
    quantized_linear_q8.cpp / .py       the same with activations rounded to Q8 blocks (integer dots)
    quantized_weights.py                QuantizedWeight: the blocks that kernel reads
    decode_layer.cpp / .py              one decoder layer of an all-decode step in one call: the
                                        kernels above in a layer's order (engine/model/layers/
                                        fused_decode.py decides when a layer takes it)
"""
