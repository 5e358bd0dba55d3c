"""Incremental detokenization with stop-string matching for one sample.

`tokenizers`' DecodeStream buffers tokens until they form whole UTF-8 characters, so no half
character is ever emitted.  Stop strings are searched in the text across token boundaries; while
a request runs, the last (longest stop string - 1) characters stay withheld, since they may be
the start of a stop string that the next token completes.
"""

from __future__ import annotations

from tokenizers.decoders import DecodeStream

from engine.tokenizer.tokenizer import Tokenizer


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, stop_strings: list[str], skip_special_tokens: bool,
                 include_stop_str_in_output: bool = False) -> None:
        self._tokenizer = tokenizer
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self._stop_strings = stop_strings
        self._include_stop = include_stop_str_in_output
        self._holdback = max((len(s) for s in stop_strings), default=1) - 1
        self.text = ""  # everything decoded so far (truncated at a stop string once matched)
        self.matched_stop: str | None = None

    def add_token(self, token_id: int) -> str | None:
        """Append one token; returns the stop string if the text now contains one."""
        piece = self._stream.step(self._tokenizer.backend, token_id)
        if not piece:
            return None
        search_from = max(0, len(self.text) - self._holdback)
        self.text += piece
        return self._find_stop(search_from)

    def _find_stop(self, search_from: int) -> str | None:
        best: tuple[int, str] | None = None
        for stop in self._stop_strings:
            index = self.text.find(stop, search_from)
            if index >= 0 and (best is None or index < best[0]):
                best = (index, stop)
        if best is None:
            return None
        index, stop = best
        self.text = self.text[: index + len(stop) if self._include_stop else index]
        self.matched_stop = stop
        return stop

    def output_text(self, finished: bool) -> str:
        """What a caller may show now: all of it once finished, else minus the held-back tail."""
        if finished or not self._holdback:
            return self.text
        return self.text[: max(0, len(self.text) - self._holdback)]
