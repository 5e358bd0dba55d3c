"""Incremental detokenization and chat templates on the real tokenizer."""

from __future__ import annotations

import pytest

from engine.model.loader import load_tokenizer, resolve_model
from engine.tokenizer.chat_template import ChatTemplateError, render_chat_template
from engine.tokenizer.detokenizer import IncrementalDetokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model(None))


def test_never_emits_half_a_utf8_character(tokenizer):
    text = "Snow ☃, robots 🤖🤖, naïve café, 日本語のテキスト."
    ids = tokenizer.encode(text)
    assert len(ids) > len(text.split())  # multi-byte characters span several tokens
    detok = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=True)
    seen = []
    for token_id in ids:
        detok.add_token(token_id)
        seen.append(detok.output_text(finished=False))
    assert all("\ufffd" not in s for s in seen)
    assert all(b.startswith(a) for a, b in zip(seen, seen[1:]))
    assert seen[-1] == text


def test_stop_string_is_withheld_while_it_may_still_complete(tokenizer):
    ids = tokenizer.encode("Hello world, the end. More text")
    detok = IncrementalDetokenizer(tokenizer, ["the end"], skip_special_tokens=True)
    emitted = ""
    for token_id in ids:
        stop = detok.add_token(token_id)
        emitted = detok.output_text(finished=stop is not None)
        assert "the e" not in emitted or stop is not None
        if stop:
            break
    assert stop == "the end" and emitted == "Hello world, "


def test_chat_template_renders_the_model_template(tokenizer):
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert text.startswith("<|im_start|>system\n")


@pytest.mark.parametrize("hostile", [
    "{{ messages.__class__.__mro__[1].__subclasses__() }}",  # Python's class graph
    "{{ raise_exception.__globals__ }}",  # a function's module globals
    "{{ cycler.__init__.__globals__.os.system('touch /tmp/pwned') }}",  # a shell through jinja's own globals
    "{% include '/etc/passwd' %}",  # the file system
    "{% import 'os' as os %}",
    "{{ messages.append('x') }}",  # mutating what it is given (the immutable sandbox)
])
def test_chat_template_is_sandboxed(hostile: str):
    with pytest.raises(ChatTemplateError):
        render_chat_template(hostile, [{"role": "user", "content": "x"}], add_generation_prompt=True,
                             bos_token="", eos_token="")
    raising = "{{ raise_exception('no system role') }}"
    with pytest.raises(ChatTemplateError, match="no system role"):
        render_chat_template(raising, [], add_generation_prompt=True, bos_token="", eos_token="")
