"""A tiny random Llama for tests: HF-named random weights through the real loading path, and a
forward over AttentionMetadata built by tests/kernels/paged_batch.py."""

from __future__ import annotations

import torch

from engine.model.arch import LlamaArchConfig
from engine.model.attention_backends.metadata import AttentionBackend, AttentionMetadata
from engine.model.compute_plan import ComputePlan
from engine.model.forward_batch import ForwardBatch
from engine.model.llama import LlamaForCausalLM


def random_hf_weights(config: LlamaArchConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every weight a Llama checkpoint has, in HF names, fp32; norms random too, not just ones."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * scale

    hidden, q_dim, kv_dim = config.hidden_size, config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    weights = {"model.embed_tokens.weight": rand(config.vocab_size, hidden, scale=0.1),
               "model.norm.weight": rand(hidden, scale=0.5)}
    if not config.tie_word_embeddings:
        weights["lm_head.weight"] = rand(config.vocab_size, hidden, scale=0.1)
    shapes = {"input_layernorm.weight": (hidden,), "post_attention_layernorm.weight": (hidden,),
              "self_attn.q_proj.weight": (q_dim, hidden), "self_attn.k_proj.weight": (kv_dim, hidden),
              "self_attn.v_proj.weight": (kv_dim, hidden), "self_attn.o_proj.weight": (hidden, q_dim),
              "mlp.gate_proj.weight": (config.intermediate_size, hidden),
              "mlp.up_proj.weight": (config.intermediate_size, hidden),
              "mlp.down_proj.weight": (hidden, config.intermediate_size)}
    for layer in range(config.num_layers):
        for name, shape in shapes.items():
            weights[f"model.layers.{layer}.{name}"] = rand(*shape, scale=0.5 if len(shape) == 1 else 0.1)
    return weights


def tiny_llama(config: LlamaArchConfig, backend: AttentionBackend, plan: ComputePlan | None = None,
               seed: int = 0) -> LlamaForCausalLM:
    plan = plan or ComputePlan.reference()
    model = LlamaForCausalLM(config, backend, plan).to(plan.dtype)
    model.load_weights((name, w.to(plan.dtype)) for name, w in random_hf_weights(config, seed).items())
    return model.eval()


def forward(model: LlamaForCausalLM, input_ids: torch.Tensor, positions: torch.Tensor,
            kv_caches: list[torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
    """Final hidden states of one step (every row)."""
    batch = ForwardBatch(input_ids=input_ids, positions=positions, attention=meta,
                         request_ids=[str(i) for i in range(meta.num_seqs)],
                         logits_indices=torch.arange(input_ids.shape[0]))
    with torch.inference_mode():
        return model(batch, kv_caches)
