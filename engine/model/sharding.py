"""Which part of every weight one tensor-parallel rank holds (Megatron-style, as vLLM splits).

    q/k/v, gate/up   split by output rows (column-parallel): a rank computes its heads / neurons
    o_proj, down     split by input columns (row-parallel): a rank's partial sum, all-reduced
    embedding, LM head  split by vocabulary rows: a rank looks up / scores its ids only
    norms            whole on every rank

Heads go by KV group: a rank holds whole groups (its KV heads and the query heads that read
them), contiguous and as even as they go (SmolLM2's 3 groups over 2 ranks: 2 + 1; the all-reduce
does not care how the sum is split).  With fewer KV heads than ranks each KV head is replicated
on size / num_kv_heads ranks, which split its query heads.  FFN neurons and the vocabulary split
contiguously, in whole 32-wide quantization blocks where the sizes allow, so a GGUF file's
quantized blocks shard without being dequantized.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch

from engine.config import ConfigError
from engine.kernels.cpu.quantized_weights import BLOCK_SIZE, InputPermutedBlocks, QuantizedWeight, dequantize
from engine.model.arch import LlamaArchConfig

LinearWeight = torch.Tensor | QuantizedWeight | InputPermutedBlocks
Span = tuple[int, int]  # [start, end)


def split_evenly(total: int, parts: int, unit: int = 1) -> tuple[Span, ...]:
    """[0, total) cut into `parts` contiguous spans, in whole `unit`s where total allows, the
    first spans one unit longer where it does not divide."""
    if total % unit:
        unit = 1
    base, extra = divmod(total // unit, parts)
    spans, start = [], 0
    for part in range(parts):
        end = start + (base + (part < extra)) * unit
        spans.append((start, end))
        start = end
    return tuple(spans)


@dataclass(frozen=True)
class TensorParallelShard:
    arch: LlamaArchConfig  # the whole model's
    rank: int
    size: int
    query_heads: Span
    kv_heads: Span
    neurons: Span
    vocab: Span
    vocab_sizes: tuple[int, ...]  # every rank's vocabulary rows, rank order (the logits gather)

    @classmethod
    def for_rank(cls, arch: LlamaArchConfig, rank: int, size: int) -> TensorParallelShard:
        query_heads, kv_heads = _head_spans(arch, rank, size)
        vocab_spans = split_evenly(arch.vocab_size, size)
        neurons = split_evenly(arch.intermediate_size, size, BLOCK_SIZE)[rank]
        return cls(arch, rank, size, query_heads, kv_heads, neurons, vocab_spans[rank],
                   tuple(end - start for start, end in vocab_spans))

    @property
    def local_arch(self) -> LlamaArchConfig:
        """The architecture this rank's model is built with: its heads, neurons and vocabulary."""
        return replace(self.arch, num_heads=_length(self.query_heads), num_kv_heads=_length(self.kv_heads),
                       intermediate_size=_length(self.neurons), vocab_size=_length(self.vocab))

    def weights(self, stream: Iterator[tuple[str, LinearWeight]]) -> Iterator[tuple[str, LinearWeight]]:
        """The file's HF-named weight stream cut to this rank's parts (copies: the rest is freed)."""
        for name, weight in stream:
            yield name, self._cut(name, weight)

    def _cut(self, name: str, weight: LinearWeight) -> LinearWeight:
        head_dim = self.arch.head_dim
        if name.endswith(("q_proj.weight", "q_proj.bias")):
            return _rows(weight, *_scaled(self.query_heads, head_dim))
        if name.endswith(("k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias")):
            return _rows(weight, *_scaled(self.kv_heads, head_dim))
        if name.endswith("o_proj.weight"):
            return _columns(weight, *_scaled(self.query_heads, head_dim))
        if name.endswith(("gate_proj.weight", "up_proj.weight")):
            return _rows(weight, *self.neurons)
        if name.endswith("down_proj.weight"):
            return _columns(weight, *self.neurons)
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            return _rows(weight, *self.vocab)
        return weight  # norms


def _head_spans(arch: LlamaArchConfig, rank: int, size: int) -> tuple[Span, Span]:
    """(query heads, KV heads) of `rank`: whole KV groups, or one replicated KV head's share."""
    group = arch.num_heads // arch.num_kv_heads
    if arch.num_kv_heads >= size:
        start, end = split_evenly(arch.num_kv_heads, size)[rank]
        return (start * group, end * group), (start, end)
    replicas = size // arch.num_kv_heads
    if size % arch.num_kv_heads or group % replicas:
        raise ConfigError(f"tensor_parallel_size {size} does not split this model's {arch.num_kv_heads} KV heads "
                          f"({arch.num_heads} query heads): with fewer KV heads than ranks, it must be a multiple "
                          "of the KV heads that divides each group's query heads")
    kv_head, share = divmod(rank, replicas)
    per_rank = group // replicas
    first = kv_head * group + share * per_rank
    return (first, first + per_rank), (kv_head, kv_head + 1)


def _scaled(span: Span, factor: int) -> Span:
    return span[0] * factor, span[1] * factor


def _length(span: Span) -> int:
    return span[1] - span[0]


def _rows(weight: LinearWeight, start: int, end: int) -> LinearWeight:
    if isinstance(weight, QuantizedWeight):
        return QuantizedWeight(weight.rows(start, end).blocks.clone(), weight.format)
    return weight[start:end].clone()


def _columns(weight: LinearWeight, start: int, end: int) -> LinearWeight:
    if isinstance(weight, InputPermutedBlocks):
        # An elastic model's down projection: its columns (neurons) were moved inside blocks, so
        # a rank's share of them is no set of whole blocks; the rank holds its part dense.
        weight = weight.dequantize()
    if isinstance(weight, QuantizedWeight):
        if start % BLOCK_SIZE == 0 and end % BLOCK_SIZE == 0:
            return QuantizedWeight(weight.columns(start, end).blocks.contiguous(), weight.format)
        weight = dequantize(weight)  # a cut inside a block: this part runs dense
    return weight[:, start:end].contiguous()
