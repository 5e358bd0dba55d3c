"""elastify end to end on tiny sizes: a checkpoint the runtime can read, levels nested under the
spec's invariants, the floor's FLOP fraction low enough, and a rerun that resumes from the stages."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.elastic import elastify as elastify_module
from engine.elastic.checkpoint import load_checkpoint
from engine.elastic.elastify import DEFAULT_LEVELS, ElastifyConfig, elastify

TINY = ElastifyConfig(max_seq_len=48, num_importance_sequences=2, num_ablation_sequences=1,
                      num_recovery_sequences=2, batch_size=2)


@pytest.mark.slow
def test_elastify_writes_a_checkpoint_and_resumes(tmp_path: Path, monkeypatch) -> None:
    result = elastify(None, TINY, progress=False, directory=tmp_path)
    checkpoint = load_checkpoint(tmp_path)
    spec = checkpoint.spec
    assert spec.level_values == DEFAULT_LEVELS and len(spec.anchor_layers) == 6
    assert result.flop_fractions()[DEFAULT_LEVELS[-1]] <= 0.66
    assert sorted(checkpoint.ffn_orders[0].tolist()) == list(range(spec.intermediate_size))
    for value, layers in checkpoint.corrections.items():
        for layer, correction in enumerate(layers):
            assert (correction is None) == (layer in spec.anchor_layers), (value, layer)
            assert correction is None or correction.ffn.lora_a.shape == (8, spec.hidden_size)

    def fail(*args, **kwargs):
        raise AssertionError("a finished stage ran again")

    monkeypatch.setattr(elastify_module, "taylor_importance", fail)
    monkeypatch.setattr(elastify_module, "fit_recovery", fail)
    assert elastify(None, TINY, progress=False, directory=tmp_path).spec == spec


def test_cli_refuses_levels_that_do_not_start_at_100() -> None:
    from engine.cli import main

    with pytest.raises(SystemExit, match="levels must start at 100"):
        main(["elastify", "--levels", "90,80"])
