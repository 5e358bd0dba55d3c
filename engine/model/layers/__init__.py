"""The model's building blocks, and the only place that picks how each computes.

    linear.py      Linear: dense (oneDNN-prepacked where it applies), or quantized blocks through
                   the C++ linear; VocabEmbedding, the token table (dense or Q8_0 blocks)
    norm.py        RMSNorm, optionally fused with the residual add
    rotary.py      rotate-half RoPE (Llama 3 scaling, GGUF frequency factors)
    activation.py  SiluAndMul (SwiGLU)
    attention.py   Attention: RoPE on the fused QKV output, then the paged attention backend
    fused_decode.py  a decoder layer's all-decode step as one C++ call, where the layer would
                   run exactly those kernels (the same bits, a dozen fewer Python calls)

Each layer takes the ComputePlan (engine/model/compute_plan.py) at construction and decides its
kernel from it once; a layer's forward takes the step's ForwardBatch where it needs one.  The torch
expressions here are the reference every C++ and Triton kernel is tested against.

PERF: each layer (and the model's blocks) sets `__call__ = forward`.  nn.Module.__call__ checks
for hooks on every call, ~2 us; a decode step makes ~330 layer calls, so that was ~0.7 ms of a
~10.5 ms single-sequence step.  The price: module hooks do not fire on these classes (the engine
registers none).
"""
