"""A Llama-family decoder (Llama 2/3, SmolLM/SmolLM2, TinyLlama, Mistral, Qwen2).

The forward runs over one flattened batch (ForwardBatch): decode tokens and prefill chunks of
many requests in a single [num_tokens, hidden] tensor; attention is the only place sequences are
told apart.  Q/K/V are one fused projection (`wqkv`) and gate/up another (`w13`), as in gpt-fast.
Each layer hands the next its output and the residual stream separately, so that the residual
add fuses into the next norm (as in vLLM).  How each layer computes (torch, C++, Triton; dense or
quantized weights) is the layers' business (engine/model/layers/), decided once from the
ComputePlan: nothing here chooses a kernel.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from engine.distributed.group import TensorParallelGroup
from engine.kernels.cpu.quantized_weights import QuantizedWeight, concat_rows, dequantize
from engine.model.arch import LlamaArchConfig
from engine.model.attention_backends.metadata import AttentionBackend
from engine.model.compute_plan import ComputePlan
from engine.model.forward_batch import ElasticRows, ForwardBatch
from engine.model.layers.activation import SiluAndMul
from engine.model.layers.attention import Attention
from engine.model.layers.elastic import BlockElasticity, LayerElasticity, RowLevels, column_tiles, zero_dropped_columns
from engine.model.layers.fused_decode import FusedDecode, fused_run
from engine.model.layers.linear import ElasticSlices, Linear, LinearWeight, VocabEmbedding
from engine.model.layers.norm import RMSNorm
from engine.model.layers.prompt_pruning import PromptPruner, WindowScorer
from engine.model.layers.rotary import RotaryEmbedding
from engine.model.sharding import TensorParallelShard


# A step mixing levels runs each level's rows through that level's slices from this many rows
# (_forward_level_groups of both blocks); below it, every row runs at the widest level present.
GROUPED_LEVELS_MIN_ROWS = 64


def runs_level_groups(num_rows: int, rows: ElasticRows | None) -> bool:
    """Whether a block on level slices runs each level's rows through its own slices this step."""
    return rows is not None and num_rows >= GROUPED_LEVELS_MIN_ROWS and len(rows.level_groups()) > 1


class SelfAttention(nn.Module):
    def __init__(self, config: LlamaArchConfig, backend: AttentionBackend, plan: ComputePlan,
                 elastic: BlockElasticity | None = None, scorer: WindowScorer | None = None) -> None:
        super().__init__()
        self.q_dim, self.kv_dim = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        # A block every level runs whole (an anchor layer's) computes like a plain model's.
        tiled = elastic is not None and not elastic.is_whole
        qkv_ext, wo_ext = elastic.folded.extensions() if tiled else (None, None)
        qkv_slices = ElasticSlices("rows", (0,), elastic.widths, (self.q_dim, self.q_dim + 2 * self.kv_dim)) if tiled else None
        self.wqkv = Linear(config.hidden_size, self.q_dim + 2 * self.kv_dim, config.attention_bias, plan,
                           qkv_slices, qkv_ext)
        # An elastic model's query heads sit in rank-major slots (engine/elastic/spec.py), in
        # every layer, whole ones included: the permutation moves them all.
        self.attn = Attention(config.num_heads, config.num_kv_heads, config.head_dim, backend, plan,
                              rank_major=elastic is not None, scorer=scorer)
        self.wo = Linear(self.q_dim, config.hidden_size, False, plan,
                         ElasticSlices("columns", (0,), elastic.widths) if tiled else None, wo_ext)
        self.elastic = elastic if tiled else None
        # Per level index: the query heads of each KV group it keeps (its head ranks).
        self.group_heads = None if not tiled else tuple(w // self.kv_dim for w in elastic.widths)

    def forward(self, x: torch.Tensor, kv_cache: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        path = "plain" if self.elastic is None else elastic_path(x.shape[0], batch.elastic, self.wqkv, self.wo)
        if path == "slices":
            if runs_level_groups(x.shape[0], batch.elastic):
                return self._forward_level_groups(x, kv_cache, batch, batch.elastic)
            return self._forward_level_slice(x, kv_cache, batch, batch.elastic)
        if path == "tiles":
            return self._forward_tiles(x, kv_cache, batch, batch.elastic)
        return self.wo(self.attn(self.wqkv(x, batch), kv_cache, batch), batch)

    def _forward_level_slice(self, x: torch.Tensor, kv_cache: torch.Tensor, batch: ForwardBatch,
                             rows: ElasticRows | None) -> torch.Tensor:
        """Prepacked weights: every row through the widest present level's slices, one GEMM per
        linear, attention over that level's query heads only; a narrower row's extra heads are
        skipped in decode attention and zeroed before o_proj.  Side paths ride in the slices."""
        levels, folded = RowLevels.of(rows), self.elastic.folded
        width = self.elastic.widths[levels.widest]
        qkv_width = width + 2 * self.kv_dim
        projected = self.wqkv.forward_level(x, width)  # [T, qkv_width + side ranks]: Q, K, V, side paths
        wo_input = x.new_empty(x.shape[0], width + folded.size)
        group_heads = None if levels.single is not None else rows.per_row(self.group_heads)
        self.attn(projected[:, :qkv_width], kv_cache, batch, group_heads, width // self.kv_dim,
                  out=wo_input[:, :width])
        zero_dropped_columns(wo_input[:, :width], levels, self.elastic.widths)
        folded.fill_hidden(projected[:, qkv_width:], wo_input[:, width:], levels)
        out = self.wo.forward_level(wo_input, width, folded.bias_of_one_level(levels))
        folded.add_biases(out, levels)
        return out

    def _forward_level_groups(self, x: torch.Tensor, kv_cache: torch.Tensor, batch: ForwardBatch,
                              rows: ElasticRows) -> torch.Tensor:
        """Prepacked weights, rows of several levels in a large step: each level's rows through
        its own QKV and o_proj slices (as FeedForward._forward_level_groups), attention once over
        every row at the widest level's head slots, each row reading its own level's heads.
        PERF: a prefill chunk at level 40 beside decodes at 70 ran its Q and o_proj at 70's heads
        (every head: levels above 55 keep them all), ~25% more time than the same chunk beside
        decodes at 40 (benchmarks/README.md, "Mixed levels in large steps")."""
        folded, widths, kv_width = self.elastic.folded, self.elastic.widths, 2 * self.kv_dim
        groups = rows.level_groups()  # widest first
        widest = widths[groups[0][0]]
        x_levels = rows.to_level_order(x)
        # Level order.  Zeros: a narrower row's query-head slots past its level stay finite (the
        # backend may compute them; nothing reads their outputs).
        qkv = x.new_zeros(x.shape[0], widest + kv_width)
        side = x.new_empty(x.shape[0], folded.size)
        for index, start, end in groups:
            width = widths[index]
            projected = self.wqkv.forward_level(x_levels[start:end], width)  # Q, K, V, side paths
            qkv[start:end, :width] = projected[:, :width]
            qkv[start:end, widest:] = projected[:, width:width + kv_width]
            side[start:end] = projected[:, width + kv_width:]
        heads = rows.to_level_order(self.attn(rows.to_batch_order(qkv), kv_cache, batch, rows.per_row(self.group_heads),
                                              widest // self.kv_dim))
        out = x.new_empty(x.shape[0], self.wo.out_features)
        for index, start, end in groups:
            width = widths[index]
            wo_input = x.new_empty(end - start, width + folded.size)
            wo_input[:, :width] = heads[start:end, :width]
            folded.fill_hidden(side[start:end], wo_input[:, width:], RowLevels(None, index, index))
            out[start:end] = self.wo.forward_level(wo_input, width, folded.biases[index])
        return rows.to_batch_order(out)

    def _forward_tiles(self, x: torch.Tensor, kv_cache: torch.Tensor, batch: ForwardBatch,
                       rows: ElasticRows) -> torch.Tensor:
        """Weights with views (dense, quantized): column tiles in level order, side paths apart."""
        x_levels = rows.to_level_order(x)
        tiles = column_tiles(self.elastic.widths, rows.rows_upto)
        # Zeros: a dropped head's query stays finite; its output is never read by wo's tiles.
        qkv = x.new_zeros(x.shape[0], self.wqkv.out_features)
        for num_rows, start, end in tiles:
            self.wqkv.forward_rows(x_levels[:num_rows], start, end, out=qkv[:num_rows, start:end])
        self.wqkv.forward_rows(x_levels, self.q_dim, self.wqkv.out_features, out=qkv[:, self.q_dim:])
        heads = rows.to_level_order(self.attn(rows.to_batch_order(qkv), kv_cache, batch,
                                              rows.per_row(self.group_heads)))
        out = x.new_zeros(x.shape[0], self.wo.out_features)
        for num_rows, start, end in tiles:
            out[:num_rows] += self.wo.forward_columns(heads[:num_rows, start:end], start, end)
        self.elastic.add_side_paths(out, x_levels, rows, native=self.wo.plan.native_ops)
        return rows.to_batch_order(out)

    __call__ = forward  # PERF: skips nn.Module.__call__, see engine/model/layers/__init__.py


class FeedForward(nn.Module):
    def __init__(self, config: LlamaArchConfig, plan: ComputePlan, elastic: BlockElasticity | None = None) -> None:
        super().__init__()
        self.intermediate_size = size = config.intermediate_size
        tiled = elastic is not None and not elastic.is_whole  # see SelfAttention
        w13_ext, w2_ext = elastic.folded.extensions() if tiled else (None, None)
        # Gate rows [0, I) and up rows [I, 2I) are cut alike.
        self.w13 = Linear(config.hidden_size, 2 * size, False, plan,
                          ElasticSlices("rows", (0, size), elastic.widths) if tiled else None, w13_ext)
        self.act = SiluAndMul(plan)
        self.w2 = Linear(size, config.hidden_size, False, plan,
                         ElasticSlices("columns", (0,), elastic.widths) if tiled else None, w2_ext)
        self.elastic = elastic if tiled else None

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        path = "plain" if self.elastic is None else elastic_path(x.shape[0], batch.elastic, self.w13, self.w2)
        if path == "slices":
            if runs_level_groups(x.shape[0], batch.elastic):
                return self._forward_level_groups(x, batch.elastic)
            return self._forward_level_slice(x, RowLevels.of(batch.elastic))
        if path == "tiles":
            return self._forward_tiles(x, batch.elastic)
        return self.w2(self.act(self.w13(x, batch)), batch)

    def _forward_level_groups(self, x: torch.Tensor, rows: ElasticRows) -> torch.Tensor:
        """Prepacked weights, rows of several levels in a large step: each level's rows through
        its own slices (_forward_level_slice at one level).  Each group reads its own slice, where
        the widest-level path reads one; but a large step is bound by multiply-adds, not weight
        reads, and a prefill chunk at a narrow level beside a few wider decodes would otherwise run
        every one of its rows at their width."""
        x_levels = rows.to_level_order(x)
        out = torch.empty_like(x_levels)
        for index, start, end in rows.level_groups():
            out[start:end] = self._forward_level_slice(x_levels[start:end], RowLevels(None, index, index))
        return rows.to_batch_order(out)

    def _forward_level_slice(self, x: torch.Tensor, levels: RowLevels) -> torch.Tensor:
        """Prepacked weights: every row through the widest present level's neurons (gate rows
        [0, w), up rows [I, I + w), down columns [0, w)), one GEMM per linear; a narrower row's
        extra neurons are zeroed before the down projection.  Side paths ride in the slices."""
        folded = self.elastic.folded
        width = self.elastic.widths[levels.widest]
        projected = self.w13.forward_level(x, width)  # [T, 2 width + side ranks]: gate, up, side paths
        hidden = projected.new_empty(x.shape[0], width + folded.size)
        self.act(projected, width, hidden[:, :width])
        zero_dropped_columns(hidden[:, :width], levels, self.elastic.widths)
        folded.fill_hidden(projected[:, 2 * width:], hidden[:, width:], levels)
        out = self.w2.forward_level(hidden, width, folded.bias_of_one_level(levels))
        folded.add_biases(out, levels)
        return out

    def _forward_tiles(self, x: torch.Tensor, rows: ElasticRows) -> torch.Tensor:
        """Weights with views (dense, quantized): column tiles in level order, side paths apart."""
        x_levels = rows.to_level_order(x)
        tiles = column_tiles(self.elastic.widths, rows.rows_upto)
        size = self.intermediate_size
        # Columns a row's level does not keep stay unwritten; SiLU runs over them, no tile reads them.
        gate_up = x.new_empty(x.shape[0], 2 * size)
        for num_rows, start, end in tiles:
            self.w13.forward_rows(x_levels[:num_rows], start, end, out=gate_up[:num_rows, start:end])
            self.w13.forward_rows(x_levels[:num_rows], size + start, size + end,
                                  out=gate_up[:num_rows, size + start: size + end])
        hidden = self.act(gate_up)
        if self.w2.reads_whole_columns(x.shape[0]):  # no column views: one call, dropped neurons zero
            kept = torch.zeros_like(hidden)
            for num_rows, start, end in tiles:
                kept[:num_rows, start:end] = hidden[:num_rows, start:end]
            out = self.w2(kept)
        else:
            out = x.new_zeros(x.shape[0], self.w2.out_features)
            for num_rows, start, end in tiles:
                out[:num_rows] += self.w2.forward_columns(hidden[:num_rows, start:end], start, end)
        self.elastic.add_side_paths(out, x_levels, rows, native=self.w2.plan.native_ops)
        return rows.to_batch_order(out)

    __call__ = forward  # PERF: skips nn.Module.__call__, see engine/model/layers/__init__.py


def elastic_path(num_rows: int, rows: ElasticRows | None, first: Linear, second: Linear) -> str:
    """How an elastic block runs this step: "slices" (level slices, prepacked), "tiles" (column
    tiles over views of dense or quantized weights) or "plain" (every row at the full level, each
    linear in its own best form, Linear.forward).  Each linear says whether it runs slices at this
    row count; a GGUF file may keep one of the two as floats (SmolLM2's down projections), which
    then has only slices, while the other runs its quantized blocks at a few rows."""
    first_slices, second_slices = first.runs_level_slices(num_rows), second.runs_level_slices(num_rows)
    if rows is None and not (first_slices and second_slices):
        return "plain"
    if first_slices or second_slices:
        return "slices"
    return "plain" if rows is None else "tiles"


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaArchConfig, backend: AttentionBackend, plan: ComputePlan,
                 elastic: LayerElasticity | None = None, scorer: WindowScorer | None = None,
                 tp: TensorParallelGroup | None = None) -> None:
        """`tp`: this rank's shard of a tensor-parallel model: attention and FFN outputs are
        partial sums (row-parallel o_proj and down), all-reduced here before the residual add."""
        super().__init__()
        self.tp = tp
        self.attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, plan)
        self.attention = SelfAttention(config, backend, plan, None if elastic is None else elastic.attention, scorer)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, plan)
        self.feed_forward = FeedForward(config, plan, None if elastic is None else elastic.ffn)
        # The same kernels in one C++ call, for the steps that would run exactly them (few-row decodes).
        self.fused_decode = FusedDecode.for_layer(self, plan)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, kv_cache: torch.Tensor,
                batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, residual) -> (this layer's FFN output, the residual stream before it); the stream
        is x + residual, and just x for the first layer.  Layer by layer: the model's forward
        runs the layers whose `fused_decode` runs this step as one C++ call instead."""
        if residual is None:
            residual, h = x, self.attention_norm(x)
        else:
            h, residual = self.attention_norm(x, residual)
        h = self.attention(h, kv_cache, batch)
        if self.tp is not None:
            self.tp.all_reduce_(h)
        h, residual = self.ffn_norm(h, residual)
        out = self.feed_forward(h, batch)
        if self.tp is not None:
            self.tp.all_reduce_(out)
        return out, residual

    __call__ = forward  # PERF: skips nn.Module.__call__, see engine/model/layers/__init__.py


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: LlamaArchConfig, backend: AttentionBackend, plan: ComputePlan,
                 elastic: Sequence[LayerElasticity] | None = None, pruner: PromptPruner | None = None,
                 tp: TensorParallelGroup | None = None, shard: TensorParallelShard | None = None) -> None:
        """`elastic`: per layer, the widths and side paths of each elastic level (its weights then
        load already reordered, engine/elastic/permutation.py); None for a plain model.
        `pruner`: the prune layers of prompt pruning (a KV group each); None: one group.
        `tp`, `shard`: this rank of a tensor-parallel group and what it holds; `config` is then
        the shard's (engine/model/sharding.py)."""
        super().__init__()
        self.config = config
        self.tp, self.shard = tp, shard
        self.plan = plan
        self.is_elastic = elastic is not None
        self.pruner = pruner
        self.tok_embeddings = VocabEmbedding(config.vocab_size, config.hidden_size, plan,
                                             *((shard.vocab[0], tp) if tp is not None else ()))
        per_layer = elastic if elastic is not None else [None] * config.num_layers
        self.layers = nn.ModuleList(DecoderLayer(config, backend, plan, layer, pruner and pruner.scorer_for(index), tp)
                                    for index, layer in enumerate(per_layer))
        self._layers = tuple(self.layers)  # PERF: indexing a ModuleList costs a string key
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, plan)
        self.output = Linear(config.hidden_size, config.vocab_size, False, plan)
        self.rotary = RotaryEmbedding.for_config(config)
        self.requires_grad_(False)

    def forward(self, batch: ForwardBatch, kv_caches: list[torch.Tensor],
                hidden_cache: torch.Tensor | None = None) -> torch.Tensor:
        """-> final hidden states [num_tokens, hidden] (the last deep group's rows where the batch
        has them).  `hidden_cache`: group 0's store of the residual stream entering l_1."""
        x = self.tok_embeddings(batch.input_ids)
        batch.rope = self.rotary.tables(batch.positions, x.dtype)
        residual = None
        index, num_layers = 0, len(self.layers)
        while index < num_layers:
            stage = None if batch.kept is None else self.pruner.stage_at(index)
            if stage is not None:
                x, residual = self.pruner(stage, x, residual, batch, hidden_cache)
                kept = batch.kept[stage]
                if kept.attention is None:
                    return x  # no rows go on: nothing samples this step
                if kept.source_rows is not None:  # rows moved: RoPE at their positions
                    batch.rope = self.rotary.tables(batch.positions, x.dtype)
            # The layers from here to the next prune layer (where the rows may change) that take
            # the one-call path, as one call.
            stop = num_layers if batch.kept is None else next(
                (layer for layer in self.pruner.prune_layers if layer > index), num_layers)
            fused = fused_run(self._layers, index, stop, x, residual, kv_caches, batch)
            if fused:
                x, residual = FusedDecode.run_layers(fused, x, residual, kv_caches[index:index + len(fused)], batch)
                index += len(fused)
            else:
                x, residual = self._layers[index](x, residual, kv_caches[index], batch)
                index += 1
        return self.norm(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Only the rows that sample this step, or score a prompt, come here; logits are fp32."""
        logits = self.output(hidden).float()
        if self.tp is not None:  # each rank scored its vocabulary rows
            logits = self.tp.gather_columns(logits, self.shard.vocab_sizes)
        return logits

    def load_weights(self, weights: Iterable[tuple[str, LinearWeight]]) -> None:
        """Take HF-named weights (float tensors or quantized blocks), fusing q/k/v into wqkv and
        gate/up into w13 (quantized blocks fuse too: they are rows of whole blocks)."""
        params = dict(self.named_parameters())
        linears = {name: module for name, module in self.named_modules() if isinstance(module, Linear | VocabEmbedding)}
        pending: dict[str, dict[str, LinearWeight]] = {}
        loaded: set[str] = set()
        for hf_name, tensor in weights:
            name, part = _our_name(hf_name)
            if name is None or (name == "output.weight" and self.config.tie_word_embeddings):
                continue
            if part is not None:
                parts = pending.setdefault(name, {})
                parts[part] = tensor
                order = _FUSED_ORDER[name.split(".", 2)[2]]  # "layers.N.<key>"
                if not set(order) <= parts.keys():
                    continue
                tensor = _concat_rows([parts[p] for p in order])
                del pending[name]
            self._load_one(name, tensor, params, linears)
            loaded.add(name)
        self._check_all_loaded(params, linears, loaded)

    def _load_one(self, name: str, tensor: LinearWeight, params: dict[str, nn.Parameter],
                  linears: dict[str, nn.Module]) -> None:
        module_name, _, attribute = name.rpartition(".")
        if attribute == "weight" and module_name in linears:
            linears[module_name].load(tensor)
        else:
            params[name].data.copy_(tensor)

    def _check_all_loaded(self, params: dict[str, nn.Parameter], linears: dict[str, nn.Module],
                          loaded: set[str]) -> None:
        if "output.weight" not in loaded and "tok_embeddings.weight" in loaded:
            # Tied (or tying without saying so: no lm_head shipped): the LM head reads the table.
            self.output.load(self.tok_embeddings.table)
            loaded.add("output.weight")
        expected = set(params) | {f"{name}.weight" for name in linears}
        missing = sorted(expected - loaded)
        if missing:
            raise ValueError(f"checkpoint is missing weights: {missing[:8]}")


def _concat_rows(parts: list[LinearWeight]) -> LinearWeight:
    """Fused rows of q/k/v or gate/up; blocks stay blocks only where every part has one format."""
    if all(isinstance(p, QuantizedWeight) for p in parts) and len({p.format for p in parts}) == 1:
        return concat_rows(parts)
    dtype = next((p.dtype for p in parts if isinstance(p, torch.Tensor)), torch.float32)
    return torch.cat([dequantize(p).to(dtype) if isinstance(p, QuantizedWeight) else p for p in parts], dim=0)


# HF parameter names -> ours; fused targets record which slice they fill, in concatenation order.
_FUSED_ORDER = {
    "attention.wqkv.weight": ("q", "k", "v"),
    "attention.wqkv.bias": ("q", "k", "v"),
    "feed_forward.w13.weight": ("gate", "up"),
}
_LAYER_NAMES = {
    "input_layernorm.weight": ("attention_norm.weight", None),
    "post_attention_layernorm.weight": ("ffn_norm.weight", None),
    "self_attn.q_proj.weight": ("attention.wqkv.weight", "q"),
    "self_attn.k_proj.weight": ("attention.wqkv.weight", "k"),
    "self_attn.v_proj.weight": ("attention.wqkv.weight", "v"),
    "self_attn.q_proj.bias": ("attention.wqkv.bias", "q"),
    "self_attn.k_proj.bias": ("attention.wqkv.bias", "k"),
    "self_attn.v_proj.bias": ("attention.wqkv.bias", "v"),
    "self_attn.o_proj.weight": ("attention.wo.weight", None),
    "mlp.gate_proj.weight": ("feed_forward.w13.weight", "gate"),
    "mlp.up_proj.weight": ("feed_forward.w13.weight", "up"),
    "mlp.down_proj.weight": ("feed_forward.w2.weight", None),
}
_TOP_NAMES = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}


def _our_name(hf_name: str) -> tuple[str | None, str | None]:
    if hf_name in _TOP_NAMES:
        return _TOP_NAMES[hf_name], None
    if hf_name.startswith("model.layers."):
        index, rest = hf_name[len("model.layers."):].split(".", 1)
        if rest in _LAYER_NAMES:
            name, part = _LAYER_NAMES[rest]
            return f"layers.{index}.{name}", part
    return None, None  # rotary inv_freq buffers and the like
