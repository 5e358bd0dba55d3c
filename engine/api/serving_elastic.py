"""The elastic level a request asks for, from any of the three places a client may say it.

    "elastic": {"level": 80}            this engine's field
    "vllm_xargs": {"elastic_level": 80} vLLM's per-request extras
    "model": "SmolLM2-135M-Instruct@80" a model alias, listed by /v1/models

At most one level may be named (two that differ are a 400); none means the server's default
(`--elastic-level`).  Whether the model has that level is the engine's check (InvalidRequestError
naming `elastic.level`), so the offline API and the server agree.
"""

from __future__ import annotations

from engine.api.async_engine import AsyncEngine
from engine.api.errors import APIError
from engine.api.protocol import SamplingFields

ALIAS_SEPARATOR = "@"
XARGS_LEVEL = "elastic_level"


def model_aliases(engine: AsyncEngine) -> list[str]:
    """`name@level` for every level of an elastic model (the plain name serves the server's
    default level)."""
    return [f"{engine.model_name}{ALIAS_SEPARATOR}{level}" for level in engine.elastic_levels or ()]


def alias_level(model: str | None, engine: AsyncEngine) -> int | None:
    """The level a `model` alias names; None for the plain name or no model.  An alias of another
    model, or a level suffix that is not an integer, is a 400 naming `model`."""
    if not model or model == engine.model_name:
        return None
    name, separator, level = model.rpartition(ALIAS_SEPARATOR)
    if not separator or name != engine.model_name:
        raise APIError(f"The model `{model}` does not exist. This server serves `{engine.model_name}`"
                       + (f" and its elastic levels {model_aliases(engine)}." if engine.elastic_levels else "."),
                       param="model", code="model_not_found")
    if not level.isdigit():
        raise APIError(f"The elastic level in `{model}` must be an integer, as in `{engine.model_name}@80`.",
                       param="model", code="model_not_found")
    return int(level)


def requested_level(request: SamplingFields, engine: AsyncEngine) -> int | None:
    """The one level the request names, or None (the server's default)."""
    named: dict[str, int] = {}
    if request.elastic is not None and request.elastic.level is not None:
        named["elastic.level"] = request.elastic.level
    xargs_level = (request.vllm_xargs or {}).get(XARGS_LEVEL)
    if xargs_level is not None:
        if isinstance(xargs_level, bool) or not isinstance(xargs_level, int):
            raise APIError(f"vllm_xargs.{XARGS_LEVEL} must be an integer level, got {xargs_level!r}.",
                           param=f"vllm_xargs.{XARGS_LEVEL}")
        named[f"vllm_xargs.{XARGS_LEVEL}"] = xargs_level
    from_alias = alias_level(request.model, engine)
    if from_alias is not None:
        named["model"] = from_alias
    if len(set(named.values())) > 1:
        raise APIError(f"Conflicting elastic levels: {named}; name one.", param=next(iter(named)))
    return next(iter(named.values()), None)
