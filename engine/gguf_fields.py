"""One GGUF metadata field by key: what both the tokenizer (its vocabulary, merges and special
ids) and the model's GGUF loader (the architecture) read from a GGUF file.  It sits outside both
packages so that the tokenizer needs nothing from the model package."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.gguf_file import GGUFFile


def field_value(reader: GGUFFile, key: str, default: Any = None) -> Any:
    """The field's contents (a string, number or list), or `default` where the file lacks it."""
    field = reader.fields.get(key)
    return default if field is None else field.contents()
