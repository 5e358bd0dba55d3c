"""The elastic level and prompt_keep a request asks for, from any of the places a client may say them.

    "elastic": {"level": 80}            this engine's field
    "vllm_xargs": {"elastic_level": 80} vLLM's per-request extras
    "model": "SmolLM2-135M-Instruct@80" a model alias, listed by /v1/models

At most one level may be named (two that differ are a 400); none means the server's default
(`--elastic-level`).  Whether the model has that level is the engine's check (InvalidRequestError
naming `elastic.level`), so the offline API and the server agree.

prompt_keep the same way: `"elastic": {"prompt_keep": 0.5}` or `"vllm_xargs": {"prompt_keep": 0.5}`
(two that differ are a 400), else the server's `--prompt-keep`; the engine checks the range.

Either may be "auto": the slo policy then picks it under the load (engine/scheduler/elastic_choice.py),
never below `"elastic": {"min_level": 70, "min_prompt_keep": 0.5}`; `--elastic-auto` makes both
auto for requests that name neither.
"""

from __future__ import annotations

from engine.api.async_engine import AsyncEngine
from engine.api.errors import APIError
from engine.api.protocol import SamplingFields
from engine.scheduler.elastic_choice import AUTO

ALIAS_SEPARATOR = "@"
XARGS_LEVEL = "elastic_level"
XARGS_PROMPT_KEEP = "prompt_keep"


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


def requested_level(request: SamplingFields, engine: AsyncEngine) -> int | str | None:
    """The one level the request names ("auto" included), or None (the server's default)."""
    named: dict[str, int | str] = {}
    if request.elastic is not None and request.elastic.level is not None:
        named["elastic.level"] = request.elastic.level
    xargs_level = (request.vllm_xargs or {}).get(XARGS_LEVEL)
    if xargs_level is not None:
        if isinstance(xargs_level, bool) or not (isinstance(xargs_level, int) or xargs_level == AUTO):
            raise APIError(f"vllm_xargs.{XARGS_LEVEL} must be an integer level or \"auto\", got {xargs_level!r}.",
                           param=f"vllm_xargs.{XARGS_LEVEL}")
        named[f"vllm_xargs.{XARGS_LEVEL}"] = xargs_level
    from_alias = alias_level(request.model, engine)
    if from_alias is not None:
        named["model"] = from_alias
    if len(set(named.values())) > 1:
        raise APIError(f"Conflicting elastic levels: {named}; name one.", param=next(iter(named)))
    return next(iter(named.values()), None)


def requested_prompt_keep(request: SamplingFields) -> float | str | None:
    """The one prompt_keep the request names, or None (the server's default).  Range checks are
    the engine's (InvalidRequestError naming `elastic.prompt_keep`); a non-number in vllm_xargs,
    which msgspec does not type, is caught here."""
    named: dict[str, float | str] = {}
    if request.elastic is not None and request.elastic.prompt_keep is not None:
        named["elastic.prompt_keep"] = request.elastic.prompt_keep
    xargs_keep = (request.vllm_xargs or {}).get(XARGS_PROMPT_KEEP)
    if xargs_keep is not None:
        if isinstance(xargs_keep, bool) or not (isinstance(xargs_keep, int | float) or xargs_keep == AUTO):
            raise APIError(f"vllm_xargs.{XARGS_PROMPT_KEEP} must be a number in (0, 1] or \"auto\", got "
                           f"{xargs_keep!r}.", param=f"vllm_xargs.{XARGS_PROMPT_KEEP}")
        named[f"vllm_xargs.{XARGS_PROMPT_KEEP}"] = xargs_keep if xargs_keep == AUTO else float(xargs_keep)
    if len(set(named.values())) > 1:
        raise APIError(f"Conflicting prompt_keep values: {named}; name one.", param=next(iter(named)))
    return next(iter(named.values()), None)


def requested_floors(request: SamplingFields) -> tuple[int | None, float | None]:
    """(min_level, min_prompt_keep): the quality floors of settings left to the server (checked
    by the engine, which names `elastic.min_level` or `elastic.min_prompt_keep` in a 400)."""
    if request.elastic is None:
        return None, None
    return request.elastic.min_level, request.elastic.min_prompt_keep
