"""The elastic torch model is the engine's model: same logits in fp32, and its level machinery
(selections, corrections, capture) does what its docstring says."""

from __future__ import annotations

import torch

from engine.elastic.torch_model import BlockCorrection, LayerCorrection, LayerSelection, Site

PROMPT = "The capital of France is Paris. The capital of Italy is"


def test_logits_match_the_engine_fp32(llm_fp32, torch_llama) -> None:
    from engine.bench.teacher_forcing import prefill_logits

    token_ids = llm_fp32.get_tokenizer().encode(PROMPT)
    expected = prefill_logits(llm_fp32, token_ids, torch.arange(len(token_ids)))
    with torch.no_grad():
        logits = torch_llama(torch.tensor([token_ids]))[0]
    assert (logits - expected).abs().max().item() <= 1e-4


def test_right_padding_leaves_earlier_rows_alone(torch_llama) -> None:
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    # fp32 GEMMs of 6 and of 9 rows may take different kernels (MKL under AVX2 does): logits of
    # ~20 then differ by up to 2.5e-4, where a leak of padding into earlier rows moves them by units.
    with torch.no_grad():
        assert torch.allclose(torch_llama(ids)[0], torch_llama(padded)[0, :6], atol=1e-3)


def test_selecting_everything_in_another_order_changes_nothing(torch_llama) -> None:
    config = torch_llama.config
    ids = torch.tensor([[5, 17, 300, 2, 99]])
    shuffled = [LayerSelection(torch.randperm(config.intermediate_size), torch.randperm(config.num_heads))
                for _ in range(config.num_layers)]
    with torch.no_grad():
        assert torch.allclose(torch_llama(ids), torch_llama(ids, shuffled), atol=1e-4)


def test_corrections_add_bias_and_low_rank_term_with_gradients(torch_llama) -> None:
    config, ids = torch_llama.config, torch.tensor([[5, 17, 300]])
    hidden = config.hidden_size
    lora_a = torch.zeros(2, hidden, requires_grad=True)
    lora_b = torch.randn(hidden, 2)
    corrections = [LayerCorrection(ffn=BlockCorrection(torch.full((hidden,), 0.01), lora_a, lora_b))] + [None] * (
        config.num_layers - 1)
    seen: dict[Site, torch.Tensor] = {}
    logits = torch_llama(ids, corrections=corrections,
                         capture=lambda layer, site, t: seen.setdefault(site, t) if layer == 0 else None)
    with torch.no_grad():
        plain = torch_llama(ids)
    assert not torch.allclose(logits, plain)
    logits.sum().backward()
    assert lora_a.grad is not None and lora_a.grad.abs().sum() > 0
    assert seen[Site.NEURONS].shape == (1, 3, config.intermediate_size)
    assert seen[Site.HEADS].shape == (1, 3, config.num_heads, config.head_dim)


def test_a_cut_submodel_gives_the_submodels_logits(torch_llama) -> None:
    """Cutting a selection's weights once (as distillation does) is the same forward as cutting them
    every call: in fp32, and cast to bf16 under autocast (which casts the uncut weights the same way)."""
    config = torch_llama.config
    ids = torch.tensor([[5, 17, 300, 2, 99, 41]])
    generator = torch.Generator().manual_seed(0)
    submodel = [LayerSelection(torch.randperm(config.intermediate_size, generator=generator)[:200 + 40 * layer],
                               torch.randperm(config.num_heads, generator=generator)[:3 + layer % 5])
                for layer in range(config.num_layers)]
    with torch.no_grad():
        expected = torch_llama(ids, submodel)
        assert torch.equal(torch_llama(ids, torch_llama.cut_submodel(submodel, torch.float32)), expected)
        assert not torch.allclose(expected, torch_llama(ids), atol=1e-2)  # the selection matters
        cut = torch_llama.cut_submodel(submodel, torch.bfloat16)
        assert all(w.dtype == torch.bfloat16 for s in cut for w in s.cut.values() if w is not None and w.dim() == 2)
        assert cut[1].cut["mlp.down_proj.weight"].shape == (config.hidden_size, 240)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.allclose(torch_llama(ids, cut), torch_llama(ids, submodel), atol=1e-5)
