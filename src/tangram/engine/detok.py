"""Incremental detokenization with stop strings: emit only text that can no longer change or be a stop."""

from __future__ import annotations


class TextStream:
    """Turns a growing list of generated token ids into text deltas, cutting at the first stop string.

    Text ending in an incomplete UTF-8 sequence, or in a prefix of a stop string,
    is held back until the next token decides it.
    """

    def __init__(self, tokenizer, stops: list[str]) -> None:
        self.tokenizer, self.stops = tokenizer, stops
        self.text = ""  # text emitted so far
        self.stopped = False

    def push(self, token_ids: list[int]) -> str:
        """Delta of text after the generated ids are now `token_ids`; sets `stopped` at a stop string."""
        full = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        cut = min((i for i in (full.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return self._emit(full[:cut])
        safe = len(full.rstrip("\ufffd"))  # an incomplete multi-byte character decodes to U+FFFD
        for s in self.stops:
            for k in range(min(len(s) - 1, safe), 0, -1):
                if full[:safe].endswith(s[:k]):
                    safe -= k
                    break
        return self._emit(full[:safe])

    def flush(self, token_ids: list[int]) -> str:
        """The held-back rest at the end of generation."""
        if self.stopped:
            return ""
        return self._emit(self.tokenizer.decode(token_ids, skip_special_tokens=True))

    def _emit(self, upto: str) -> str:
        if len(upto) <= len(self.text):
            return ""
        delta = upto[len(self.text):]  # earlier text is never revised: it was emitted already
        self.text = upto
        return delta
