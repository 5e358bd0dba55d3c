"""Chat templates rendered in jinja2's immutable sandbox: a template ships inside a model file
and is untrusted input, so it gets no access to Python internals."""

from __future__ import annotations

from datetime import datetime
from functools import lru_cache

from jinja2 import DictLoader, TemplateError
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    """The template failed to render these messages (or raised on purpose, as many do)."""


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _Sandbox(ImmutableSandboxedEnvironment):
    """jinja2's immutable sandbox, stricter in two ways: an unsafe attribute (`__class__`,
    `__globals__`, ...) fails at once instead of rendering as an empty Undefined, and the loader
    holds no templates, so `include`, `import` and `extends` find nothing (the file system stays
    out of reach) and fail as template errors."""

    def unsafe_undefined(self, obj: object, attribute: str):
        raise SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__} is not allowed")


@lru_cache(maxsize=8)
def _compile(source: str):
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"], loader=DictLoader({}))
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def render_chat_template(source: str, messages: list[dict], *, add_generation_prompt: bool,
                         bos_token: str, eos_token: str) -> str:
    try:
        return _compile(source).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                       bos_token=bos_token, eos_token=eos_token)
    except TemplateError as exc:
        raise ChatTemplateError(f"chat template failed: {exc}") from exc
