"""The engine's tokenizer: a `tokenizers.Tokenizer` plus the special ids and chat template a
model file carries.  Built from GGUF metadata (gpt2-style BPE with merges) or from a Hugging
Face directory's tokenizer.json / tokenizer_config.json."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

from engine.config import ModelFileError
from engine.gguf_fields import field_value
from engine.tokenizer.chat_template import render_chat_template

if TYPE_CHECKING:
    from engine.gguf_file import GGUFFile

# GGUF token types (llama.cpp's llama_token_type)
_CONTROL, _USER_DEFINED = 3, 4


@dataclass
class Tokenizer:
    backend: HFTokenizer
    bos_token_id: int | None
    eos_token_id: int | None
    add_bos_token: bool
    chat_template: str | None
    # Every id that ends generation (eos plus e.g. generation_config's extra eos ids).
    stop_token_ids: frozenset[int] = frozenset()

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, token_ids: list[int]) -> list[str]:
        return [self.backend.id_to_token(i) or "" for i in token_ids]

    def token_text(self, token_id: int) -> str:
        """One token's text as it reads in output (byte-level pieces decoded)."""
        return self.backend.decode([token_id], skip_special_tokens=False)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise ValueError("this model has no chat template; use the completions API instead")
        return render_chat_template(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                                    bos_token=self._token_str(self.bos_token_id),
                                    eos_token=self._token_str(self.eos_token_id))

    def _token_str(self, token_id: int | None) -> str:
        return "" if token_id is None else (self.backend.id_to_token(token_id) or "")


def tokenizer_from_gguf(reader: GGUFFile) -> Tokenizer:
    model = field_value(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise ModelFileError(f"{reader.path}: unsupported GGUF tokenizer model {model!r}; "
                             "supported: gpt2 (byte-level BPE)")
    tokens = field_value(reader, "tokenizer.ggml.tokens")
    token_types = field_value(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in field_value(reader, "tokenizer.ggml.merges")]
    backend = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                     fuse_unk=False, byte_fallback=False))
    backend.pre_tokenizer = _gguf_pre_tokenizer(field_value(reader, "tokenizer.ggml.pre", "default"))
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, kind in zip(tokens, token_types) if kind == _CONTROL])
    backend.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, kind in zip(tokens, token_types) if kind == _USER_DEFINED])
    eos = field_value(reader, "tokenizer.ggml.eos_token_id")
    extra_eos = field_value(reader, "tokenizer.ggml.eot_token_id")
    return Tokenizer(
        backend=backend,
        bos_token_id=field_value(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=eos,
        add_bos_token=bool(field_value(reader, "tokenizer.ggml.add_bos_token", False)),
        chat_template=field_value(reader, "tokenizer.chat_template"),
        stop_token_ids=frozenset(i for i in (eos, extra_eos) if i is not None),
    )


def _gguf_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    """GPT-2's byte-level split, whatever `tokenizer.ggml.pre` says.

    The reference we match is transformers loading the same GGUF, which ignores the pre type.
    (For "smollm", llama.cpp also splits every digit first; the two disagree only where spaces
    run into digits, e.g. " \n2": ' ', '\n', '2' here against ' \n', '2' there.)
    """
    del pre
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def tokenizer_from_hf_dir(model_dir: Path) -> Tokenizer:
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise ValueError(f"{model_dir} has no tokenizer.json")
    backend = HFTokenizer.from_file(str(path))
    config = _read_json(model_dir / "tokenizer_config.json")
    generation = _read_json(model_dir / "generation_config.json")
    bos_id = _token_id(backend, config.get("bos_token"))
    eos_id = _token_id(backend, config.get("eos_token"))
    extra_eos = generation.get("eos_token_id")
    extra_eos = extra_eos if isinstance(extra_eos, list) else [extra_eos]
    # tokenizer.json's post-processor adds BOS itself where the model wants one.
    return Tokenizer(
        backend=backend, bos_token_id=bos_id, eos_token_id=eos_id, add_bos_token=False,
        chat_template=_chat_template(model_dir, config),
        stop_token_ids=frozenset(i for i in (eos_id, *extra_eos) if i is not None),
    )


def _chat_template(model_dir: Path, config: dict) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default") or next(iter(named.values()), None)
    jinja_file = model_dir / "chat_template.jinja"
    if template is None and jinja_file.is_file():
        template = jinja_file.read_text()
    return template


def _token_id(backend: HFTokenizer, token) -> int | None:
    if isinstance(token, dict):  # {"content": "<s>", ...}
        token = token.get("content")
    return None if token is None else backend.token_to_id(token)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}
