"""The GGUF loader on a small file written here: every supported tensor type dequantizes to the
weights it was written from, Q/K rows come back in HF order, and the model runs on them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q, GGUFReader, GGUFWriter
from gguf.quants import quantize

from engine.model.gguf_loader import iter_gguf_weights, read_arch_config, unpermute_qk
from engine.model.compute_plan import ComputePlan
from engine.model.llama import LlamaForCausalLM
from tests.tiny_llama import forward
from engine.model.attention_backends.metadata import AttentionMetadata
from engine.model.attention_backends.torch_backend import TorchAttentionBackend

HIDDEN, FFN, HEADS, KV_HEADS, VOCAB, LAYERS = 64, 128, 4, 2, 96, 2
HEAD_DIM = HIDDEN // HEADS
# Each type's worst error on N(0, 0.02) weights, with margin.
TOLERANCE = {Q.F32: 0.0, Q.F16: 1e-4, Q.BF16: 5e-4, Q.Q8_0: 5e-4, Q.Q4_1: 6e-3, Q.Q4_0: 8e-3}


def llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """What llama.cpp's converter does to HF's Q/K rows (rotate-half pairs -> interleaved)."""
    rows = weight.shape[0]
    return weight.reshape(num_heads, 2, rows // num_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def hf_weights(rng: np.random.Generator) -> dict[str, np.ndarray]:
    w = lambda *shape: (rng.standard_normal(shape) * 0.02).astype(np.float32)  # noqa: E731
    weights = {"model.embed_tokens.weight": w(VOCAB, HIDDEN), "model.norm.weight": 1 + w(HIDDEN),
               "lm_head.weight": w(VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        weights |= {p + "input_layernorm.weight": 1 + w(HIDDEN), p + "post_attention_layernorm.weight": 1 + w(HIDDEN),
                    p + "self_attn.q_proj.weight": w(HIDDEN, HIDDEN), p + "self_attn.k_proj.weight": w(KV_HEADS * HEAD_DIM, HIDDEN),
                    p + "self_attn.v_proj.weight": w(KV_HEADS * HEAD_DIM, HIDDEN), p + "self_attn.o_proj.weight": w(HIDDEN, HIDDEN),
                    p + "mlp.gate_proj.weight": w(FFN, HIDDEN), p + "mlp.up_proj.weight": w(FFN, HIDDEN),
                    p + "mlp.down_proj.weight": w(HIDDEN, FFN)}
    return weights


GGUF_NAMES = {"model.embed_tokens.weight": ("token_embd.weight", Q.Q8_0), "model.norm.weight": ("output_norm.weight", Q.F32),
              "lm_head.weight": ("output.weight", Q.Q4_1)}
LAYER_TYPES = {"input_layernorm": ("attn_norm", Q.F32), "post_attention_layernorm": ("ffn_norm", Q.F32),
               "self_attn.q_proj": ("attn_q", Q.Q4_0), "self_attn.k_proj": ("attn_k", Q.Q4_1),
               "self_attn.v_proj": ("attn_v", Q.F16), "self_attn.o_proj": ("attn_output", Q.BF16),
               "mlp.gate_proj": ("ffn_gate", Q.Q8_0), "mlp.up_proj": ("ffn_up", Q.Q4_0), "mlp.down_proj": ("ffn_down", Q.F16)}


def gguf_name_and_type(hf_name: str) -> tuple[str, Q]:
    if hf_name in GGUF_NAMES:
        return GGUF_NAMES[hf_name]
    _, _, index, rest = hf_name.split(".", 3)
    kind, _ = rest.rsplit(".", 1)
    name, qtype = LAYER_TYPES[kind]
    return f"blk.{index}.{name}.weight", qtype


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple[str, dict[str, np.ndarray]]:
    weights = hf_weights(np.random.default_rng(0))
    path = str(tmp_path_factory.mktemp("gguf") / "tiny.gguf")
    writer = GGUFWriter(path, "llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(VOCAB)
    for hf_name, array in weights.items():
        name, qtype = gguf_name_and_type(hf_name)
        if "q_proj" in hf_name:
            array = llama_cpp_permute(array, HEADS)
        elif "k_proj" in hf_name:
            array = llama_cpp_permute(array, KV_HEADS)
        if qtype == Q.F32:
            writer.add_tensor(name, array)
        else:
            writer.add_tensor(name, quantize(array, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path, weights


def test_unpermute_inverts_llama_cpp_permute():
    weight = np.arange(8 * 16 * 3, dtype=np.float32).reshape(8 * 16, 3)
    assert np.array_equal(unpermute_qk(llama_cpp_permute(weight, 8), 8), weight)


def test_arch_config_from_metadata(written):
    config = read_arch_config(GGUFReader(written[0]))
    assert (config.hidden_size, config.intermediate_size, config.num_layers) == (HIDDEN, FFN, LAYERS)
    assert (config.num_heads, config.num_kv_heads, config.head_dim, config.vocab_size) == (HEADS, KV_HEADS, HEAD_DIM, VOCAB)
    assert not config.tie_word_embeddings and not config.attention_bias


def test_every_tensor_type_loads_back_in_hf_layout(written):
    path, weights = written
    reader = GGUFReader(path)
    loaded = dict(iter_gguf_weights(reader, read_arch_config(reader), torch.float32))
    assert loaded.keys() == weights.keys()
    for hf_name, expected in weights.items():
        _, qtype = gguf_name_and_type(hf_name)
        got = loaded[hf_name].numpy()
        assert got.shape == expected.shape, hf_name
        assert np.abs(got - expected).max() <= TOLERANCE[qtype], (hf_name, qtype.name)


def test_model_runs_on_the_loaded_weights(written):
    path, _ = written
    reader = GGUFReader(path)
    config = read_arch_config(reader)
    model = LlamaForCausalLM(config, TorchAttentionBackend(), ComputePlan.reference())
    model.load_weights(iter_gguf_weights(reader, config, torch.float32))
    num_tokens = 5
    kv = [torch.zeros(2, 1, 16, KV_HEADS, HEAD_DIM) for _ in range(LAYERS)]
    meta = AttentionMetadata(slot_mapping=torch.arange(num_tokens), query_start_loc=torch.tensor([0, num_tokens], dtype=torch.int32),
                             seq_lens=torch.tensor([num_tokens], dtype=torch.int32), block_tables=torch.zeros(1, 1, dtype=torch.int32),
                             num_decodes=0, max_query_len=num_tokens, max_seq_len=num_tokens, block_size=16,
                             query_start_loc_cpu=[0, num_tokens], seq_lens_cpu=[num_tokens])
    hidden = forward(model, torch.tensor([1, 5, 9, 2, 7]), torch.arange(num_tokens), kv, meta)
    logits = model.compute_logits(hidden)
    assert logits.shape == (num_tokens, VOCAB) and torch.isfinite(logits).all()
