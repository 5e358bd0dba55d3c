"""A plain fp32, differentiable Llama forward over HF-named weights, at any elastic level.

Elastification (importance, anchors, closed-form recovery) and distillation need what the engine's
model deliberately is not: autograd, a [B, T] batch with no KV cache, any subset of FFN neurons and
query heads per layer, per-level correction terms, and a look at every block's activations.  This
module is that model, kept small and numerically the engine's (RMSNorm in fp32, the engine's own
rotate-half RoPE tables, softmax(QK^T / sqrt(D)) V): tests/elastic/test_torch_model.py holds its
logits to LLM(dtype="float32", weight_format="dequantized") within 1e-4.

API
---
    model = TorchLlama.load(None)                      # default model; or a GGUF file / HF directory
    model = TorchLlama(arch, weights)                  # weights: {hf_name: fp32 tensor}, as the loaders name them
    logits = model(input_ids)                          # [B, T] int64 -> [B, T, vocab] fp32
    logits = model(input_ids, submodel, corrections, capture)

- `submodel`: one `LayerSelection` per layer (None: the whole model), each naming the FFN neurons
  and query heads that layer keeps, by index into the model's own weights (any subset, any
  order: the result does not depend on the order).  `prefix_submodel(level, ffn_orders,
  head_orders)` builds the selection of an ElasticLevel (a prefix of each order, query heads in
  rank-major slots); on a permuted model pass `identity_orders(...)`.  `model.cut_submodel(submodel,
  dtype)` cuts (and casts) its weights once, for a loop that runs it many times.
- `corrections`: one `LayerCorrection | None` per layer: per block (attn, ffn) an optional bias
  [H] and low-rank pair lora_a [r, H], lora_b [H, r]:
      block_out = block(x_normed) + bias + (x_normed @ lora_a.T) @ lora_b.T
  where x_normed is the block's input after its RMSNorm (the checkpoint's convention,
  engine/elastic/checkpoint.py).  Tensors with requires_grad train through the forward.
- `capture(layer, site, tensor)`: called at every `Site` of every layer with the live tensor; it
  may keep it, and may return a tensor of the same shape to use in its place (None: unchanged).
  Importance returns `tensor * gate` with a ones gate [B, 1, ...] that requires grad: the gate's
  gradient is then each sequence's first-order Taylor score, sum over tokens of a * dL/da.
- Batches are right-padded: attention is causal, so pad tokens after a sequence's end never
  change its rows; mask them out of any loss (`token_nll` takes a mask).
- Weights never require grad; only corrections (and whatever the caller hooks) do.

Query heads: in the file's (HF) layout head h reads KV head h // group_size.  A model whose
q_proj rows / o_proj columns were permuted into rank-major slots (engine/elastic/permutation.py)
reads KV head s % num_kv_heads from slot s: pass `rank_major_heads=True`.

Step by step (sequential fitting walks the layers itself): `embed`, `rope`, `layer`,
`attention_block`, `ffn_block`, `final_norm`, `logits`.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.elastic.spec import ElasticLevel
from engine.model.arch import LlamaArchConfig
from engine.model.layers.rotary import RotaryEmbedding, apply_rotary


class Site(enum.Enum):
    """Where `capture` sees a layer's activations."""

    ATTN_INPUT = "attn.input"  # [B, T, H] the attention block's input after its RMSNorm
    HEADS = "attn.heads"  # [B, T, kept heads, D] each kept query head's output, before o_proj
    ATTN_OUTPUT = "attn.output"  # [B, T, H] the block's output (corrections included), before the residual add
    FFN_INPUT = "ffn.input"  # [B, T, H] the FFN block's input after its RMSNorm
    NEURONS = "ffn.neurons"  # [B, T, kept neurons] silu(gate) * up: the input of down_proj
    FFN_OUTPUT = "ffn.output"  # [B, T, H]


Capture = Callable[[int, Site, torch.Tensor], torch.Tensor | None]


@dataclass(frozen=True)
class LayerSelection:
    """What one layer keeps: int64 indices into its FFN neurons and its query heads (None: all).
    `cut`: the layer's projection weights already cut to this selection (TorchLlama.cut_submodel),
    by CUT_NAMES; None: the forward cuts them from the whole weights each call."""

    ffn_neurons: torch.Tensor | None = None
    query_heads: torch.Tensor | None = None
    cut: Mapping[str, torch.Tensor | None] | None = None


# The projection weights (and biases) a cut selection carries: q, o and the FFN's cut to it, k and
# v whole (KV heads are never pruned), all cast to the cut's dtype.
CUT_NAMES = tuple(f"self_attn.{p}_proj.{kind}" for p in "qkvo" for kind in ("weight", "bias")) + tuple(
    f"mlp.{p}_proj.weight" for p in ("gate", "up", "down"))


@dataclass(frozen=True)
class BlockCorrection:
    """A block's recovery terms: out += bias + (x_normed @ lora_a.T) @ lora_b.T (each optional)."""

    bias: torch.Tensor | None = None  # [H]
    lora_a: torch.Tensor | None = None  # [r, H]
    lora_b: torch.Tensor | None = None  # [H, r]

    def apply(self, x_normed: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.lora_a is not None and self.lora_b is not None:
            out = out + (x_normed @ self.lora_a.T) @ self.lora_b.T
        return out if self.bias is None else out + self.bias


@dataclass(frozen=True)
class LayerCorrection:
    attn: BlockCorrection | None = None
    ffn: BlockCorrection | None = None


Rope = tuple[torch.Tensor, torch.Tensor]  # apply_rotary's (cos, [-sin, sin]), [T, 1, D]


class TorchLlama:
    """fp32 Llama-family decoder over a dict of HF-named weights; see the module docstring."""

    def __init__(self, config: LlamaArchConfig, weights: Mapping[str, torch.Tensor],
                 rank_major_heads: bool = False) -> None:
        self.config = config
        self.weights = {name: tensor.float().requires_grad_(False) for name, tensor in weights.items()}
        if "lm_head.weight" not in self.weights:  # tied embeddings: the LM head reads the table
            self.weights["lm_head.weight"] = self.weights["model.embed_tokens.weight"]
        self.rank_major_heads = rank_major_heads
        self._rotary = RotaryEmbedding.for_config(config)
        heads = torch.arange(config.num_heads)
        group_size = config.num_heads // config.num_kv_heads
        # KV head each query head (or slot) reads: see the module docstring.
        self.kv_head_of = heads % config.num_kv_heads if rank_major_heads else heads // group_size

    @classmethod
    def load(cls, model: str | None = None) -> TorchLlama:
        """The model file's weights, dequantized to fp32 (GGUF Q/K rows in HF rotate-half layout)."""
        from engine.model.loader import resolve_model

        source = resolve_model(model)
        return cls(source.arch, dict(iter_fp32_weights(model)))

    # --- the whole forward -------------------------------------------------------------------

    def __call__(self, input_ids: torch.Tensor, submodel: Sequence[LayerSelection] | None = None,
                 corrections: Sequence[LayerCorrection | None] | None = None,
                 capture: Capture | None = None) -> torch.Tensor:
        """[B, T] token ids -> [B, T, vocab] fp32 logits."""
        return self.logits(self.hidden_states(input_ids, submodel, corrections, capture))

    def hidden_states(self, input_ids: torch.Tensor, submodel: Sequence[LayerSelection] | None = None,
                      corrections: Sequence[LayerCorrection | None] | None = None,
                      capture: Capture | None = None) -> torch.Tensor:
        """[B, T] -> the final RMSNorm's output [B, T, H]."""
        h = self.embed(input_ids)
        rope = self.rope(input_ids.shape[1])
        for index in range(self.config.num_layers):
            selection = submodel[index] if submodel is not None else None
            correction = corrections[index] if corrections is not None else None
            h = self.layer(index, h, rope, selection, correction, capture)
        return self.final_norm(h)

    # --- step by step ------------------------------------------------------------------------

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weights["model.embed_tokens.weight"])

    def rope(self, num_tokens: int) -> Rope:
        return self._rotary.cos_sin(torch.arange(num_tokens), torch.float32)

    def layer(self, index: int, h: torch.Tensor, rope: Rope, selection: LayerSelection | None = None,
              correction: LayerCorrection | None = None, capture: Capture | None = None) -> torch.Tensor:
        """The residual stream [B, T, H] after layer `index`."""
        selection = selection or LayerSelection()
        prefix = f"model.layers.{index}."
        x = rms_norm(h, self.weights[prefix + "input_layernorm.weight"], self.config.rms_norm_eps)
        x = _see(capture, index, Site.ATTN_INPUT, x)
        out = self.attention_block(index, x, rope, selection.query_heads, capture, selection.cut)
        if correction is not None and correction.attn is not None:
            out = correction.attn.apply(x, out)
        h = h + _see(capture, index, Site.ATTN_OUTPUT, out)
        x = rms_norm(h, self.weights[prefix + "post_attention_layernorm.weight"], self.config.rms_norm_eps)
        x = _see(capture, index, Site.FFN_INPUT, x)
        out = self.ffn_block(index, x, selection.ffn_neurons, capture, selection.cut)
        if correction is not None and correction.ffn is not None:
            out = correction.ffn.apply(x, out)
        return h + _see(capture, index, Site.FFN_OUTPUT, out)

    def attention_block(self, index: int, x: torch.Tensor, rope: Rope, query_heads: torch.Tensor | None = None,
                        capture: Capture | None = None, cut: Mapping[str, torch.Tensor | None] | None = None,
                        ) -> torch.Tensor:
        """Causal GQA self-attention of the normed input [B, T, H] over the kept query heads
        (`cut`: their weights already cut, see LayerSelection)."""
        config = self.config
        batch, num_tokens = x.shape[:2]
        heads = torch.arange(config.num_heads) if query_heads is None else query_heads
        w = cut or self._attention_weights(index, query_heads)
        q = _project(x, w["self_attn.q_proj.weight"], w["self_attn.q_proj.bias"])
        k = _project(x, w["self_attn.k_proj.weight"], w["self_attn.k_proj.bias"])
        v = _project(x, w["self_attn.v_proj.weight"], w["self_attn.v_proj.bias"])
        q = apply_rotary(q.view(batch, num_tokens, len(heads), config.head_dim), *rope).transpose(1, 2)
        k = apply_rotary(k.view(batch, num_tokens, config.num_kv_heads, config.head_dim), *rope).transpose(1, 2)
        v = v.view(batch, num_tokens, config.num_kv_heads, config.head_dim).transpose(1, 2)
        if query_heads is None and not self.rank_major_heads:  # HF's grouping: SDPA's own GQA
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            kv_heads = self.kv_head_of[heads]  # each kept query head's KV head
            out = F.scaled_dot_product_attention(q, k[:, kv_heads], v[:, kv_heads], is_causal=True)
        out = out.transpose(1, 2)
        out = _see(capture, index, Site.HEADS, out)
        return out.reshape(batch, num_tokens, -1) @ w["self_attn.o_proj.weight"].T

    def ffn_block(self, index: int, x: torch.Tensor, ffn_neurons: torch.Tensor | None = None,
                  capture: Capture | None = None, cut: Mapping[str, torch.Tensor | None] | None = None,
                  ) -> torch.Tensor:
        """SwiGLU of the normed input [B, T, H] over the kept neurons (`cut`: see LayerSelection)."""
        w = cut or self._ffn_weights(index, ffn_neurons)
        neurons = F.silu(x @ w["mlp.gate_proj.weight"].T) * (x @ w["mlp.up_proj.weight"].T)
        neurons = _see(capture, index, Site.NEURONS, neurons)
        return neurons @ w["mlp.down_proj.weight"].T

    def _attention_weights(self, index: int, query_heads: torch.Tensor | None) -> dict[str, torch.Tensor | None]:
        """The layer's attention projections, q rows and o columns cut to `query_heads`."""
        prefix = f"model.layers.{index}."
        w = {name: self.weights.get(prefix + name) for name in CUT_NAMES if name.startswith("self_attn.")}
        if query_heads is not None:  # PERF: gathers cost ~10% of a layer; the whole model skips them
            head_dim = self.config.head_dim
            q_rows = (query_heads[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)
            w["self_attn.q_proj.weight"] = w["self_attn.q_proj.weight"][q_rows]
            w["self_attn.o_proj.weight"] = w["self_attn.o_proj.weight"][:, q_rows]
            if w["self_attn.q_proj.bias"] is not None:
                w["self_attn.q_proj.bias"] = w["self_attn.q_proj.bias"][q_rows]
        return w

    def _ffn_weights(self, index: int, ffn_neurons: torch.Tensor | None) -> dict[str, torch.Tensor | None]:
        """The layer's FFN projections cut to `ffn_neurons` (gate/up rows, down columns)."""
        prefix, w = f"model.layers.{index}.mlp.", self.weights
        gate, up, down = w[prefix + "gate_proj.weight"], w[prefix + "up_proj.weight"], w[prefix + "down_proj.weight"]
        if ffn_neurons is not None:
            gate, up, down = gate[ffn_neurons], up[ffn_neurons], down[:, ffn_neurons]
        return {"mlp.gate_proj.weight": gate, "mlp.up_proj.weight": up, "mlp.down_proj.weight": down}

    def cut_submodel(self, submodel: Sequence[LayerSelection], dtype: torch.dtype) -> list[LayerSelection]:
        """`submodel` with every layer's projection weights cut once and cast to `dtype`, for a loop
        that runs one submodel many times (distillation): its forward then gathers nothing, and
        under autocast to `dtype` its matmuls cast no weight.  Norms, embeddings and the LM head
        are not cut (they stay the model's)."""
        cut = []
        for index, selection in enumerate(submodel):
            weights = {**self._attention_weights(index, selection.query_heads),
                       **self._ffn_weights(index, selection.ffn_neurons)}
            # Biases stay fp32, as the uncut forward adds them (a bf16 matmul's output + fp32).
            cast = {name: None if tensor is None else tensor.to(dtype if tensor.dim() == 2 else tensor.dtype).contiguous()
                    for name, tensor in weights.items()}
            cut.append(LayerSelection(selection.ffn_neurons, selection.query_heads, cast))
        return cut

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        return rms_norm(h, self.weights["model.norm.weight"], self.config.rms_norm_eps)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden @ self.weights["lm_head.weight"].T


# --- levels as selections ------------------------------------------------------------------------

def prefix_submodel(level: ElasticLevel, ffn_orders: Sequence[torch.Tensor], head_orders: Sequence[torch.Tensor],
                    num_kv_heads: int) -> list[LayerSelection]:
    """The selection of an elastic level: per layer the first ffn_widths[l] of its FFN order and
    the first head_ranks[l] * num_kv_heads slots of its rank-major head order (the checkpoint's
    `ffn_order` / `head_order`: position i holds original index order[i])."""
    return [LayerSelection(ffn_order[:width], head_order[:ranks * num_kv_heads])
            for ffn_order, head_order, width, ranks in zip(ffn_orders, head_orders, level.ffn_widths,
                                                           level.head_ranks)]


def identity_orders(config: LlamaArchConfig) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(ffn_orders, head_orders) of a model that is already permuted: every order is arange."""
    return ([torch.arange(config.intermediate_size)] * config.num_layers,
            [torch.arange(config.num_heads)] * config.num_layers)


# --- losses --------------------------------------------------------------------------------------

def token_nll(logits: torch.Tensor, input_ids: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """-log p of each next token: logits [B, T, V] at row t predict input_ids[:, t + 1]; -> [B, T - 1]
    with zeros where `scored` [B, T - 1] (bool, for the predicted token) is False."""
    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -logprobs.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return torch.where(scored, nll, torch.zeros_like(nll))


# --- weights -------------------------------------------------------------------------------------

def iter_fp32_weights(model: str | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(hf_name, fp32 tensor) of a GGUF file (dequantized, Q/K un-permuted) or an HF directory."""
    from engine.model.gguf_loader import iter_gguf_weights, open_gguf
    from engine.model.hf_loader import iter_safetensors_weights
    from engine.model.loader import resolve_model

    source = resolve_model(model)
    if source.is_gguf:
        yield from iter_gguf_weights(open_gguf(source.path), source.arch, torch.float32,  # type: ignore[misc]
                                     keep_quantized=False)
    else:
        yield from iter_safetensors_weights(source.path, torch.float32)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out = x @ weight.T
    return out if bias is None else out + bias


def _see(capture: Capture | None, index: int, site: Site, tensor: torch.Tensor) -> torch.Tensor:
    """The activation, or what `capture` returns in its place."""
    replaced = capture(index, site, tensor) if capture is not None else None
    return tensor if replaced is None else replaced
