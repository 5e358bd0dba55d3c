"""The C++ CPU decode-attention kernel against a per-sequence fp32 reference, and its backend
against the torch backend on a mixed step, for every build of the kernels this CPU runs
(avx512_bf16, avx512, avx2).

A build needs a C++ compiler and a CPU with its instruction set; where either is missing its tests
skip and say why (the engine then runs another build, or its torch path, which other tests cover).
"""

from __future__ import annotations

import ctypes

import pytest
import torch

from engine.capabilities import cpu_features
from engine.kernels.cpu import native_library
from engine.model.attention_backends.native_cpu_backend import NativeCpuAttentionBackend
from engine.kernels.cpu.paged_decode_attention import paged_decode_attention, supports
from engine.kernels.kv_cache_format import dequantize_rows, quantize_rows
from engine.model.attention_backends.metadata import (TorchAttentionScratch, grouped_from_rank_major,
                                                      rank_major_from_grouped)
from engine.model.attention_backends.torch_backend import TorchAttentionBackend

from .paged_batch import make_metadata, random_block_tables, random_kv_cache


def reference_decode(query: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                     seq_lens: list[int]) -> torch.Tensor:
    """fp32, one sequence at a time, slots spelled out from the block table."""
    num_seqs, num_q_heads, head_dim = query.shape
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    group = num_q_heads // num_kv_heads
    flat = kv_cache.float().reshape(2, -1, num_kv_heads, head_dim)
    out = torch.empty(num_seqs, num_q_heads, head_dim)
    for seq, seq_len in enumerate(seq_lens):
        slots = [int(block_tables[seq, p // block_size]) * block_size + p % block_size for p in range(seq_len)]
        keys = flat[0, slots].repeat_interleave(group, dim=1)  # [L, Hq, D]
        values = flat[1, slots].repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,lhd->hl", query[seq].float(), keys) * head_dim ** -0.5
        out[seq] = torch.einsum("hl,lhd->hd", scores.softmax(-1), values)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_q_heads, num_kv_heads, head_dim", [
    (9, 3, 64),    # SmolLM2: groups of 3, the unrolled 64-wide path
    (8, 8, 128),   # no GQA, the unrolled 128-wide path
    (8, 2, 80),    # a head size without an unrolled path
    (16, 1, 32),   # MQA: one KV head for all
])
def test_matches_reference(library: ctypes.CDLL, dtype: torch.dtype, num_q_heads: int, num_kv_heads: int,
                           head_dim: int) -> None:
    block_size, num_blocks = 16, 64
    # one token, block edges (15, 16, 17), several blocks, one sequence much longer than the rest
    seq_lens = [1, 15, 16, 17, 50, 300]
    block_tables = random_block_tables(seq_lens, block_size, num_blocks)
    kv_cache = random_kv_cache(num_blocks, block_size, num_kv_heads, head_dim, dtype)
    query = torch.randn(len(seq_lens), num_q_heads, head_dim).to(dtype)
    out = paged_decode_attention(query, kv_cache, block_tables, torch.tensor(seq_lens, dtype=torch.int32),
                                 library=library)
    expected = reference_decode(query, kv_cache, block_tables, seq_lens)
    # the kernel works in fp32 throughout; low-precision outputs differ by their final rounding
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(out.float(), expected, **tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_q_heads, num_kv_heads, head_dim", [(9, 3, 64), (8, 8, 128), (8, 2, 80)])
def test_int8_cache_matches_the_reference_on_its_values(library: ctypes.CDLL, dtype: torch.dtype, num_q_heads: int,
                                                        num_kv_heads: int, head_dim: int) -> None:
    """An int8 cache (rows of head_dim + 4 bytes, engine/kernels/kv_cache_format.py) attends as its
    dequantized values do: the kernel's only approximation is the output's rounding."""
    block_size, num_blocks = 16, 64
    seq_lens = [1, 15, 16, 17, 50, 300]
    block_tables = random_block_tables(seq_lens, block_size, num_blocks)
    kv_cache = quantize_rows(random_kv_cache(num_blocks, block_size, num_kv_heads, head_dim, torch.float32) * 3)
    query = torch.randn(len(seq_lens), num_q_heads, head_dim).to(dtype)
    out = paged_decode_attention(query, kv_cache, block_tables, torch.tensor(seq_lens, dtype=torch.int32),
                                 library=library)
    assert out.dtype == dtype
    expected = reference_decode(query, dequantize_rows(kv_cache, torch.float32), block_tables, seq_lens)
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(out.float(), expected, **tolerance)


def test_int8_cache_with_group_heads_rank_major_and_every_build(library: ctypes.CDLL) -> None:
    """An elastic step over an int8 cache: rank-major slots at fewer heads give the grouped call's
    result, and every build the best build's bits."""
    num_q_heads, num_kv_heads, head_dim, block_size = 9, 3, 64, 16
    seq_lens = [1, 17, 40, 300, 33]
    group_heads = torch.tensor([3, 1, 2, 1, 0], dtype=torch.int32)
    block_tables = random_block_tables(seq_lens, block_size, 64)
    kv_cache = quantize_rows(random_kv_cache(64, block_size, num_kv_heads, head_dim, torch.bfloat16))
    query = torch.randn(len(seq_lens), num_q_heads, head_dim).to(torch.bfloat16)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    grouped = paged_decode_attention(grouped_from_rank_major(query, num_kv_heads), kv_cache, block_tables, lens,
                                     group_heads=group_heads, library=library)
    out = paged_decode_attention(query, kv_cache, block_tables, lens, group_heads=group_heads, rank_major=True,
                                 library=library)
    assert torch.equal(out, rank_major_from_grouped(grouped, num_kv_heads))
    best = native_library.load(cpu_features().kernel_isa)
    assert torch.equal(out, paged_decode_attention(query, kv_cache, block_tables, lens, group_heads=group_heads,
                                                   rank_major=True, library=best))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_group_heads_attend_with_the_first_heads_only(library: ctypes.CDLL, dtype: torch.dtype) -> None:
    """An elastic row keeps the first r heads of every KV group: those equal the all-heads
    result, the rest are zeros, and a count of 0 leaves the row all zeros."""
    num_q_heads, num_kv_heads, head_dim, block_size = 9, 3, 64, 16
    seq_lens = [1, 17, 40, 300, 33]
    group_heads = torch.tensor([3, 1, 2, 1, 0], dtype=torch.int32)
    block_tables = random_block_tables(seq_lens, block_size, 64)
    kv_cache = random_kv_cache(64, block_size, num_kv_heads, head_dim, dtype)
    query = torch.randn(len(seq_lens), num_q_heads, head_dim).to(dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    whole = paged_decode_attention(query, kv_cache, block_tables, lens, library=library)
    out = paged_decode_attention(query, kv_cache, block_tables, lens, group_heads=group_heads, library=library)
    group = num_q_heads // num_kv_heads
    for seq, live in enumerate(group_heads.tolist()):
        for head in range(num_q_heads):
            expected = whole[seq, head] if head % group < live else torch.zeros(head_dim, dtype=dtype)
            assert torch.equal(out[seq, head], expected), (seq, head)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rank_major_slots_give_the_grouped_result_in_slot_order(library: ctypes.CDLL, dtype: torch.dtype) -> None:
    """An elastic model's query heads in rank-major slots (slot r * Hkv + g: group g's r-th head),
    rows strided as in the fused QKV output, some rows at fewer heads: bit for bit the grouped
    call's result, moved to the same slots (a dropped head's slot zeros)."""
    num_q_heads, num_kv_heads, head_dim, block_size = 9, 3, 64, 16
    seq_lens = [1, 17, 40, 300, 33]
    group_heads = torch.tensor([3, 1, 2, 1, 0], dtype=torch.int32)
    block_tables = random_block_tables(seq_lens, block_size, 64)
    kv_cache = random_kv_cache(64, block_size, num_kv_heads, head_dim, dtype)
    qkv = torch.randn(len(seq_lens), num_q_heads + 2 * num_kv_heads, head_dim).to(dtype)
    rank_major_query = qkv[:, :num_q_heads]  # strided rows
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    grouped = paged_decode_attention(grouped_from_rank_major(rank_major_query, num_kv_heads), kv_cache, block_tables,
                                     lens, group_heads=group_heads, library=library)
    out = paged_decode_attention(rank_major_query, kv_cache, block_tables, lens, group_heads=group_heads,
                                 rank_major=True, library=library)
    assert torch.equal(out, rank_major_from_grouped(grouped, num_kv_heads))
    assert not torch.equal(out, grouped)  # the orders differ: the test can tell them apart


@pytest.mark.parametrize("kv_int8", [False, True], ids=["model-dtype-cache", "int8-cache"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_q_heads, num_kv_heads, head_dim", [
    (9, 3, 64),   # SmolLM2: rows at one or two heads a group take whole-sequence tasks
    (16, 1, 32),  # MQA without an unrolled path: one head a group does
])
def test_whole_sequence_tasks_give_the_per_head_bits(library: ctypes.CDLL, dtype: torch.dtype, kv_int8: bool,
                                                     num_q_heads: int, num_kv_heads: int, head_dim: int) -> None:
    """A batch with enough sequences attends a sequence at few heads a group as one task over all
    its KV heads (paged_decode_attention.cpp: attends_whole_sequence); alone, the same sequence is
    split per KV head.  Each head adds in the same order either way: the same bits, in both head
    orders, and the reference's values."""
    block_size, num_blocks = 16, 160
    torch.manual_seed(0)
    seq_lens = [1, 15, 16, 17, 33, 50, 300, 64, 129, 2, 31, 48, 200, 5, 90, 250]
    assert len(seq_lens) >= 4 * torch.get_num_threads(), "the batch must be large enough for whole-sequence tasks"
    group = num_q_heads // num_kv_heads
    group_heads = torch.tensor([(1, 2, group, 0)[i % 4] for i in range(len(seq_lens))], dtype=torch.int32)
    block_tables = random_block_tables(seq_lens, block_size, num_blocks)
    kv_cache = random_kv_cache(num_blocks, block_size, num_kv_heads, head_dim, dtype)
    if kv_int8:
        kv_cache = quantize_rows(kv_cache)
    query = torch.randn(len(seq_lens), num_q_heads, head_dim).to(dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    for rank_major in (False, True):
        batch = paged_decode_attention(query, kv_cache, block_tables, lens, group_heads=group_heads,
                                       rank_major=rank_major, library=library)
        for seq in range(len(seq_lens)):
            alone = paged_decode_attention(query[seq:seq + 1], kv_cache, block_tables[seq:seq + 1], lens[seq:seq + 1],
                                           group_heads=group_heads[seq:seq + 1], rank_major=rank_major,
                                           library=library)
            assert torch.equal(batch[seq], alone[0]), (rank_major, seq, int(group_heads[seq]))
    values = dequantize_rows(kv_cache, torch.float32) if kv_int8 else kv_cache
    whole = reference_decode(query, values, block_tables, seq_lens)
    grouped = paged_decode_attention(query, kv_cache, block_tables, lens, group_heads=group_heads, library=library)
    live = (torch.arange(num_q_heads) % group)[None, :] < group_heads[:, None]
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(grouped.float(), torch.where(live[..., None], whole, 0.0), **tolerance)


def test_block_size_one_and_large_scores(library: ctypes.CDLL) -> None:
    """Tiny blocks (every position its own block) and scores large enough that softmax without the
    max shift would overflow fp32."""
    seq_lens = [7, 33]
    block_tables = random_block_tables(seq_lens, 1, 48)
    kv_cache = random_kv_cache(48, 1, 2, 64, torch.float32) * 30
    query = torch.randn(2, 4, 64) * 30
    out = paged_decode_attention(query, kv_cache, block_tables, torch.tensor(seq_lens, dtype=torch.int32),
                                 library=library)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, reference_decode(query, kv_cache, block_tables, seq_lens), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_builds_agree_bit_for_bit(library: ctypes.CDLL, dtype: torch.dtype) -> None:
    """Every build adds in the same order (kSumLanes in simd.h): the best build's bits."""
    seq_lens = [1, 17, 70, 129]
    block_tables = random_block_tables(seq_lens, 16, 24)
    kv_cache = random_kv_cache(24, 16, 2, 64, dtype)
    query = torch.randn(len(seq_lens), 6, 64).to(dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    best = native_library.load(cpu_features().kernel_isa)
    assert torch.equal(paged_decode_attention(query, kv_cache, block_tables, lens, library=library),
                       paged_decode_attention(query, kv_cache, block_tables, lens, library=best))


def test_rejects_what_it_cannot_run(library: ctypes.CDLL) -> None:
    kv_cache = random_kv_cache(4, 16, 2, 72, torch.float32)  # 72 is not a multiple of 16
    assert not supports(kv_cache, num_q_heads=4)
    query = torch.randn(1, 4, 72)
    with pytest.raises(ValueError, match="does not support"):
        paged_decode_attention(query, kv_cache, torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.int32),
                               library=library)
    good_cache = random_kv_cache(4, 16, 2, 64, torch.float32)
    with pytest.raises(ValueError, match="int32"):
        paged_decode_attention(torch.randn(1, 4, 64), good_cache, torch.zeros(1, 1, dtype=torch.int64),
                               torch.ones(1, dtype=torch.int32), library=library)


@pytest.mark.parametrize("kv_int8", [False, True], ids=["bf16-cache", "int8-cache"])
@pytest.mark.parametrize("head_dim", [64, 72])  # 72: the backend falls back to the torch path
def test_backend_matches_torch_backend_on_a_mixed_step(library: ctypes.CDLL, head_dim: int, kv_int8: bool,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native_library, "load", lambda isa=None: library)  # the backend uses this build
    block_size, num_blocks = 16, 32
    context_lens, query_lens, num_decodes = [15, 16, 40, 17, 0], [1, 1, 1, 20, 9], 3
    seq_lens = [c + q for c, q in zip(context_lens, query_lens)]
    block_tables = random_block_tables(seq_lens, block_size, num_blocks)
    meta, _ = make_metadata(context_lens, query_lens, num_decodes, block_size, block_tables)
    num_tokens = sum(query_lens)
    query, key, value = (torch.randn(num_tokens, heads, head_dim).to(torch.bfloat16) for heads in (6, 2, 2))
    torch_cache = random_kv_cache(num_blocks, block_size, 2, head_dim, torch.bfloat16)
    if kv_int8:  # both backends write this step's rows with the same quantization
        torch_cache = quantize_rows(torch_cache)
    native_cache = torch_cache.clone()
    expected = TorchAttentionBackend().forward(query, key, value, torch_cache, meta)
    meta.scratch = TorchAttentionScratch()
    out = NativeCpuAttentionBackend().forward(query, key, value, native_cache, meta)
    assert torch.equal(native_cache, torch_cache)
    torch.testing.assert_close(out.float(), expected.float(), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("num_decodes", [5, 3])  # all decodes: the kernel reads the slots; mixed: regrouped
def test_backends_take_rank_major_heads(library: ctypes.CDLL, num_decodes: int,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native_library, "load", lambda isa=None: library)
    block_size, num_blocks, head_dim = 16, 32, 64
    context_lens = [15, 16, 40, 17, 3]
    query_lens = [1] * num_decodes + [20, 9][: 5 - num_decodes]
    seq_lens = [c + q for c, q in zip(context_lens, query_lens)]
    block_tables = random_block_tables(seq_lens, block_size, num_blocks)
    num_tokens = sum(query_lens)
    query, key, value = (torch.randn(num_tokens, heads, head_dim) for heads in (6, 2, 2))
    cache = random_kv_cache(num_blocks, block_size, 2, head_dim, torch.float32)
    for backend in (TorchAttentionBackend(), NativeCpuAttentionBackend()):
        meta, _ = make_metadata(context_lens, query_lens, num_decodes, block_size, block_tables)
        grouped = backend.forward(grouped_from_rank_major(query, 2), key, value, cache.clone(), meta)
        meta.scratch = TorchAttentionScratch()
        rank_major = backend.forward(query, key, value, cache.clone(), meta, rank_major=True)
        torch.testing.assert_close(rank_major, rank_major_from_grouped(grouped, 2), atol=1e-6, rtol=1e-6)
