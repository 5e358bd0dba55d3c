"""Quality of a submodel against the full model (engine/elastic/quality.py) on real text: the full
model agrees with itself, a submodel that keeps everything (in another order, its weights cut once)
scores as the full model, and a narrow one scores worse."""

from __future__ import annotations

import pytest
import torch

from engine.bench.conversations import Conversation
from engine.elastic import calibration, quality
from engine.elastic.torch_model import LayerSelection

TEXTS = [("What is the capital of France?", "The capital of France is Paris, a city on the Seine."),
         ("Name a colour of the sky.", "On a clear day the sky is blue, and at sunset it turns orange.")]


def test_measure_scores_full_reordered_and_narrow_submodels(torch_llama) -> None:
    tokenizer = calibration.default_tokenizer(None)
    conversations = [Conversation(tokenizer.encode(q), tokenizer.encode(a)) for q, a in TEXTS]
    batches = list(calibration.batches(conversations, batch_size=2, answers_only=True))
    reference = quality.reference_top1(torch_llama, batches)
    config = torch_llama.config
    full = quality.measure(torch_llama, batches, reference)
    assert full.top1_agreement == 1.0 and full.num_scored == sum(len(c.answer_token_ids) for c in conversations)
    generator = torch.Generator().manual_seed(0)
    everything = [LayerSelection(torch.randperm(config.intermediate_size, generator=generator),
                                 torch.randperm(config.num_heads, generator=generator))
                  for _ in range(config.num_layers)]
    reordered = quality.measure(torch_llama, batches, reference, everything)
    assert reordered.perplexity == pytest.approx(full.perplexity, rel=1e-4)
    assert reordered.top1_agreement == 1.0
    narrow = [LayerSelection(torch.arange(config.intermediate_size // 4), torch.arange(config.num_kv_heads))
              for _ in range(config.num_layers)]
    pruned = quality.measure(torch_llama, batches, reference, narrow)
    assert pruned.perplexity > 2 * full.perplexity and pruned.top1_agreement < 0.8
