"""A documented test hook that makes chosen requests fail, to prove that one request's failure
stays its own (and that a dead engine loop takes the server down rather than hanging it).

    ELASTIC_ENGINE_INJECT_FAULT="<stage>:<token id>"     (read once, at engine start)

Any request whose prompt contains that token id raises InjectedFault at that stage:

    detokenize    as its next token is turned into text (LLMEngine: the request fails alone,
                  finish_reason "error", counted in engine:request_errors_total{reason="detokenize"})
    engine_loop   when the serving loop takes the request (AsyncEngine: the loop itself dies, as
                  after a bug outside any one request; `engine serve` answers /health 503, ends
                  every request in flight with an error and exits non-zero)

Unset (the default) nothing is checked beyond one attribute test per token.  Tests send the
trigger as a prompt of token ids (the completions endpoint takes them).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

ENV_VAR = "ELASTIC_ENGINE_INJECT_FAULT"
STAGES = ("detokenize", "engine_loop")


class InjectedFault(RuntimeError):
    """Raised where a fault was injected; carries the stage it stands for."""

    def __init__(self, stage: str) -> None:
        super().__init__(f"fault injected at stage {stage!r} ({ENV_VAR})")
        self.stage = stage


@dataclass(frozen=True)
class FaultInjector:
    stage: str
    token_id: int

    @classmethod
    def from_env(cls) -> FaultInjector | None:
        value = os.environ.get(ENV_VAR, "").strip()
        if not value:
            return None
        stage, _, token = value.partition(":")
        if stage not in STAGES or not token.strip().isdigit():
            raise ValueError(f"{ENV_VAR} must be <stage>:<token id> with stage one of {STAGES}, got {value!r}")
        return cls(stage, int(token))

    def check(self, stage: str, prompt_token_ids: list[int]) -> None:
        if stage == self.stage and self.token_id in prompt_token_ids:
            raise InjectedFault(stage)
