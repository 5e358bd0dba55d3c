"""A Hugging Face directory (config.json, *.safetensors, tokenizer.json) loads and generates the
same tokens as the GGUF it was written from."""

from __future__ import annotations

import json

import torch
from safetensors.torch import save_file

from engine import SamplingParams
from engine.model.gguf_loader import iter_gguf_weights, open_gguf
from engine.model.loader import default_model_path, resolve_model
from tests.conftest import assert_kv_empty, make_llm


def _write_hf_directory(path) -> None:
    source = resolve_model(None)
    arch = source.arch
    weights = dict(iter_gguf_weights(open_gguf(default_model_path()), arch, torch.float32))
    save_file({k: v.contiguous() for k, v in weights.items()}, str(path / "model.safetensors"))
    config = {
        "architectures": ["LlamaForCausalLM"], "vocab_size": arch.vocab_size, "hidden_size": arch.hidden_size,
        "intermediate_size": arch.intermediate_size, "num_hidden_layers": arch.num_layers,
        "num_attention_heads": arch.num_heads, "num_key_value_heads": arch.num_kv_heads,
        "rms_norm_eps": arch.rms_norm_eps, "rope_theta": arch.rope_theta,
        "max_position_embeddings": arch.max_position_embeddings, "tie_word_embeddings": True,
    }
    (path / "config.json").write_text(json.dumps(config))


def test_hf_directory_generates_like_the_gguf(tmp_path, llm_fp32):
    _write_hf_directory(tmp_path)
    tokenizer = llm_fp32.get_tokenizer()
    tokenizer.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": tokenizer.chat_template}))
    hf_llm = make_llm(model=str(tmp_path), dtype="float32", kv_cache_memory=0.25)
    assert hf_llm.engine.model_name == tmp_path.name
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    prompts = ["The capital of France is", "def fibonacci(n):"]
    ours = [o.outputs[0].token_ids for o in hf_llm.generate(prompts, params, use_tqdm=False)]
    reference = [o.outputs[0].token_ids for o in llm_fp32.generate(prompts, params, use_tqdm=False)]
    assert ours == reference
    chat = hf_llm.get_tokenizer().apply_chat_template([{"role": "user", "content": "Hi"}])
    assert chat == tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert_kv_empty(hf_llm)
