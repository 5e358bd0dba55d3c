"""What every benchmark result says about where and how it ran: the CPU as the engine's capability
probe sees it (the ELASTIC_ENGINE_CPU_ISA mask included), and the dtype and weight format the
engine resolved ("auto" becomes a concrete choice at load, so a result names the choice)."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from typing import Any

from engine.capabilities import MASK_ENV, cpu_features, cpu_model_name


def machine() -> dict[str, Any]:
    features = cpu_features()
    return {"cpu": features.describe(), "cpu_model": cpu_model_name(), "isa_mask": features.mask,
            "cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": importlib.metadata.version("torch")}


def engine_setup(llm: Any) -> dict[str, str]:
    """The dtype and weight format a loaded `LLM` computes with."""
    runner = llm.engine.runner
    return {"dtype": runner.dtype_name, "weight_format": runner.plan.weights_label}


def machine_lines(info: dict[str, Any]) -> list[str]:
    """The machine as report lines (CPU, cores, the mask where one is set)."""
    lines = [f"CPU: {info['cpu']}; {info['cpu_count']} cores; torch {info['torch']}"]
    if info["isa_mask"] is not None:
        lines.append(f"ISA mask: {MASK_ENV}={info['isa_mask']}")
    return lines


def setup_line(name: str, setup: dict[str, str | None]) -> str:
    return f"{name}: dtype {setup['dtype'] or 'unknown'}, weights {setup['weight_format'] or 'unknown'}"
