"""How good each elastic setting is: the quality figure the SLO policy's choice ranks settings by,
and the reports weigh goodput with (issue #15).

Two measured tables, one per knob:

    level -> perplexity ratio   the level's perplexity on held-out ShareGPT answers over the full
                                model's, as the server computes it (benchmarks/elastic.py, distilled
                                recovery where the checkpoint has adapters)
    keep  -> retrieval ratio    needle-in-a-haystack accuracy at that prompt_keep over the whole
                                prompt's (benchmarks/prompt_pruning.py)

A setting's quality is 1 / (perplexity ratio) x (retrieval ratio): 1.0 for the full model on the
whole prompt, lower for every cut.  The table is stored with the elastic checkpoint
(`quality.json`, written by benchmarks/elastic.py after it measures the levels); a checkpoint
without one uses DEFAULT_QUALITY, this repository's own measurements of SmolLM2-135M (the default
model), stated with where they come from.  Nothing here imports torch: the scheduler reads it.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

QUALITY_FILE = "quality.json"
ADAPTERS_FILE = "adapters.safetensors"  # = engine.elastic.checkpoint.ADAPTERS_FILE (that module imports torch)


@dataclass(frozen=True)
class QualityTable:
    perplexity_ratio: Mapping[int, float]  # level -> ppl / full ppl (1.0 at the full level)
    retrieval_ratio: Mapping[float, float]  # prompt_keep -> accuracy / whole prompt's (1.0 at keep 1)
    source: str

    def __post_init__(self) -> None:
        if not self.perplexity_ratio or not self.retrieval_ratio:
            raise ValueError("a quality table needs at least one level and one prompt_keep")
        if any(not r >= 1.0 - 1e-9 for r in self.perplexity_ratio.values()):
            raise ValueError(f"perplexity ratios are >= 1 (a cut model is never better), got {self.perplexity_ratio}")
        if any(not 0.0 <= r <= 1.0 + 1e-9 for r in self.retrieval_ratio.values()):
            raise ValueError(f"retrieval ratios lie in [0, 1], got {self.retrieval_ratio}")

    def level_quality(self, level: int) -> float:
        """1 / perplexity ratio; a level the table lacks is interpolated between its neighbours."""
        return 1.0 / _interpolate(self.perplexity_ratio, level)

    def keep_quality(self, keep: float) -> float:
        return _interpolate(self.retrieval_ratio, keep)

    def quality(self, level: int, keep: float) -> float:
        return self.level_quality(level) * self.keep_quality(keep)

    def to_json(self) -> str:
        return json.dumps({"perplexity_ratio": {str(k): v for k, v in self.perplexity_ratio.items()},
                           "retrieval_ratio": {str(k): v for k, v in self.retrieval_ratio.items()},
                           "source": self.source}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> QualityTable:
        data = json.loads(text)
        return cls({int(k): float(v) for k, v in data["perplexity_ratio"].items()},
                   {float(k): float(v) for k, v in data["retrieval_ratio"].items()}, str(data.get("source", "")))

    def save(self, checkpoint_dir: Path) -> Path:
        path = Path(checkpoint_dir) / QUALITY_FILE
        path.write_text(self.to_json())
        return path


def load_quality_table(checkpoint_dir: Path | None) -> QualityTable:
    """The checkpoint's measured table, else the default for the recovery it serves."""
    if checkpoint_dir is None:
        return DEFAULT_QUALITY
    path = Path(checkpoint_dir) / QUALITY_FILE
    if path.is_file():
        return QualityTable.from_json(path.read_text())
    return DEFAULT_QUALITY_DISTILLED if (Path(checkpoint_dir) / ADAPTERS_FILE).is_file() else DEFAULT_QUALITY


def _interpolate(table: Mapping[float, float], x: float) -> float:
    keys = sorted(table)
    if x <= keys[0]:
        return table[keys[0]]
    if x >= keys[-1]:
        return table[keys[-1]]
    i = bisect.bisect_left(keys, x)
    if keys[i] == x:
        return table[x]
    lo, hi = keys[i - 1], keys[i]
    return table[lo] + (table[hi] - table[lo]) * (x - lo) / (hi - lo)


# SmolLM2-135M-Instruct (Q4_1 GGUF), measured in this repository on a 2-vCPU AMD EPYC (AVX512-BF16,
# no AMX), 2026-12-04: levels from benchmarks/results/elastic_epyc_q8.md (served path, 32 held-out
# ShareGPT conversations; full 5.41; closed-form 90 7.51, 80 10.64, 70 15.12, 55 106.45, 40 201.89;
# distilled 6.95, 8.86, 11.35, 26.26, 40.58), prompt_keep from benchmarks/results/prompt_pruning.md
# (prune layers 15 and 19: NIAH over 4k tokens of ShareGPT 0.75 at keep 0.3 and 0.5 against 0.75
# whole; passkey over ShareGPT 100% at both).
_FULL = 5.41


def _measured(perplexities: Mapping[int, float], name: str, recovery: str) -> QualityTable:
    return QualityTable({100: 1.0, **{level: ppl / _FULL for level, ppl in perplexities.items()}},
                        {0.3: 1.0, 0.5: 1.0, 1.0: 1.0},
                        f"engine/elastic/quality_table.py {name}, {recovery} recovery "
                        "(benchmarks/results/elastic_epyc_q8.md, prompt_pruning.md)")


DEFAULT_QUALITY = _measured({90: 7.51, 80: 10.64, 70: 15.12, 55: 106.45, 40: 201.89}, "DEFAULT_QUALITY",
                            "closed-form")
# What `engine elastify --distill` serves (thorough calibration, then distilled at lr 3e-3, bf16
# where the CPU has it, teacher targets off the budget): benchmarks/results/elastic_epyc_distill_v2.md.
DEFAULT_QUALITY_DISTILLED = _measured({90: 6.47, 80: 7.69, 70: 9.80, 55: 22.98, 40: 31.06},
                                      "DEFAULT_QUALITY_DISTILLED", "distilled")
