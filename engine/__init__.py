"""Elastic Engine: a continuous-batching LLM serving engine.

`LLM` is imported lazily so that the scheduler and KV bookkeeping (which never touch tensors) can
be imported, and tested, without loading torch.
"""

import engine.process_env  # noqa: F401  (first: sets variables torch reads when it loads)
from engine.outputs import CompletionOutput, RequestOutput
from engine.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "LLM":
        from engine.llm import LLM
        return LLM
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
