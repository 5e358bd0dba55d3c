"""C++ kernels for x86 CPUs (AVX-512), built on first use: see native_library.py.

    paged_decode_attention.cpp / .py   decode attention read in place from the paged KV cache
"""
