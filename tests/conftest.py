"""Shared fixtures: the real default model, loaded once per session, with KV invariants checked
after every engine step and an empty KV cache required after every test."""

from __future__ import annotations

import gc

import pytest

from engine import LLM
from engine.llm_engine import LLMEngine


def _checked(engine: LLMEngine) -> LLMEngine:
    """Make every step verify the KV bookkeeping (free + used == total, no double holding)."""
    step = engine.step

    def checked_step():
        outputs = step()
        engine.check_invariants()
        return outputs

    engine.step = checked_step
    return engine


_engines_built = 0


def make_llm(**kwargs) -> LLM:
    global _engines_built
    llm = LLM(**kwargs)
    _checked(llm.engine)
    _engines_built += 1
    return llm


@pytest.fixture(autouse=True)
def _free_engines_built_by_the_test():
    """An engine is a reference cycle (its step wrapper above; the engine's own callbacks), freed
    only by a full garbage collection, which Python runs after enough new objects: few, now that a
    load allocates few.  Without this the engines of a whole run piled up (~0.9 GB each) until the
    suite was killed for memory.  Collect after a test that built one (a full collection costs
    ~0.1 s here, too much to run after every test)."""
    built = _engines_built
    yield
    if _engines_built != built:
        gc.collect()


@pytest.fixture(scope="session")
def llm_fp32() -> LLM:
    """fp32, small token budget and 16-token blocks so prompts are chunked across steps."""
    return make_llm(dtype="float32", weight_format="dequantized", max_num_batched_tokens=64, block_size=16,
                    kv_cache_memory=1.0)


@pytest.fixture(scope="session")
def llm_bf16() -> LLM:
    return make_llm(dtype="bfloat16", weight_format="dequantized", kv_cache_memory=1.0)


def assert_kv_empty(llm: LLM) -> None:
    engine = llm.engine
    engine.check_invariants()
    assert not engine.has_unfinished_requests()
    assert engine.kv.pool.num_used_blocks == 0, "KV blocks leaked after all requests ended"


@pytest.fixture(scope="session")
def hf_reference():
    """transformers loading the same GGUF, fp32: the reference for tokens and logits."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.model.loader import default_model_path

    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.eval(), tokenizer
