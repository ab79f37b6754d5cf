"""Incremental detokenization with stop strings: emit only text that can no longer change or be a stop.

Per-token cost is O(1) amortized in the output length:

- a tokenizer with a Rust backend is decoded by `tokenizers.decoders.DecodeStream`, which keeps a short
  window of ids and returns only the new piece; any other tokenizer by the prefix/read-offset window
  method vLLM uses (decode a few recent ids, emit what follows the previous window's text);
- a tokenizer whose `decode` also cleans up spaces (`clean_up_tokenization_spaces`, WordPiece) gets the
  same clean-up applied piecewise, split only where no clean-up pattern can straddle the split;
- stop strings are searched in the held-back tail only (a stop cannot start in text already emitted).

Which path a tokenizer takes is checked once per tokenizer against its own full `decode` on probe texts.
If DecodeStream fails at run time, the stream resynchronizes once from a full decode and continues with
the window method. `flush` decodes the whole sequence once, so the final text is the full decode (cut at
the first stop string) wherever the full decode extends what was streamed; see `TextStream` for when not.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

REPLACEMENT = "\ufffd"  # what an incomplete multi-byte character decodes to
CONTEXT_IDS = 5  # ids before the read offset that a window decodes again (as vLLM does)
PROBE_TEXTS = (
    "Hello world! It's a test, isn't it? Yes . No ,ok I'm we've you're",
    " leading space,  double  spaces\n\tnew line and tab",
    "multi-byte: café 你好世界 🙂👍🏽 ÿ €uro ĀĂ",
)
# Consecutive non-space characters inside transformers' clean_up_tokenization patterns (" n't", " 'm", ...):
# a split between two non-space characters that are not one of these pairs is never inside a match.
_CLEANUP_PAIRS = frozenset({"n'", "'t", "'m", "'s", "'v", "ve", "'r", "re"})

Decode = Callable[[list[int]], str]


@dataclass(frozen=True)
class _Plan:
    """How one tokenizer is detokenized incrementally (decided once per tokenizer)."""

    stream: bool  # DecodeStream matches the raw decode
    backend: bool  # the raw decode is the Rust backend's (else the tokenizer's own decode)
    clean: bool  # the tokenizer's decode = clean_up_tokenization(raw decode)


_plans: weakref.WeakKeyDictionary[Any, _Plan] = weakref.WeakKeyDictionary()


class _StreamSource:
    """The tokenizers library's own incremental decoder."""

    def __init__(self, backend: Any) -> None:
        from tokenizers.decoders import DecodeStream

        self.backend, self.stream = backend, DecodeStream(skip_special_tokens=True)

    def step(self, token_id: int) -> str:
        """New text from the Rust decoder (None, while it waits, becomes "")."""
        return self.stream.step(self.backend, token_id) or ""


class _Diverged(Exception):
    """A window's text does not extend the previous window's text: resynchronize from a full decode."""


class _WindowSource:
    """vLLM's method: decode a short window of recent ids; emit what follows the previous window's text."""

    def __init__(self, decode: Decode, ids: list[int] | None = None, read: int = 0) -> None:
        self.decode = decode
        self.ids: list[int] = list(ids or [])
        self.read = read  # end of the ids whose text was emitted
        self.prefix = max(0, read - CONTEXT_IDS)  # window start: a little context before `read`

    def step(self, token_id: int) -> str:
        """New text once the window no longer ends in an incomplete character."""
        self.ids.append(token_id)
        prefix_text = self.decode(self.ids[self.prefix:self.read])
        new_text = self.decode(self.ids[self.prefix:])
        if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT):
            return ""  # no visible change yet (special token, partial byte sequence): keep the window
        if not new_text.startswith(prefix_text):
            raise _Diverged(f"window text {new_text!r} does not extend {prefix_text!r}")
        self.prefix, self.read = self.read, len(self.ids)
        if self.prefix > 4096:  # bound the list: only the window is ever read again
            del self.ids[:self.prefix]
            self.read -= self.prefix
            self.prefix = 0
        return new_text[len(prefix_text):]


class _Cleaner:
    """Applies `clean` (pure str.replace chains deleting spaces) piecewise, equal to cleaning the whole."""

    def __init__(self, clean: Callable[[str], str]) -> None:
        self.clean, self.raw = clean, ""

    def feed(self, piece: str) -> str:
        """Cleaned text up to the last split that no clean-up pattern can straddle."""
        checked = len(self.raw)  # splits before this were unsafe already
        self.raw += piece
        for p in range(len(self.raw) - 1, max(checked, 1) - 1, -1):
            a, b = self.raw[p - 1], self.raw[p]
            if not a.isspace() and not b.isspace() and a + b not in _CLEANUP_PAIRS:
                out, self.raw = self.clean(self.raw[:p]), self.raw[p:]
                return out
        return ""


def _backend(tokenizer: Any) -> Any | None:
    """The `tokenizers.Tokenizer` behind a tokenizer, or None."""
    try:
        from tokenizers import Tokenizer
    except ImportError:  # pragma: no cover - tokenizers ships with transformers
        return None
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    for name in ("_tokenizer", "backend_tokenizer"):
        backend = getattr(tokenizer, name, None)
        if isinstance(backend, Tokenizer):
            return backend
    return None


def _decoder(tokenizer: Any, backend: Any | None) -> Decode:
    """The raw decode (skipping special tokens) of the backend, or else of the tokenizer."""
    owner = backend if backend is not None else tokenizer
    return lambda ids: owner.decode(ids, skip_special_tokens=True) if ids else ""


def _check(tokenizer: Any, backend: Any) -> _Plan:
    """Compare the fast path's pieces with the tokenizer's full decode on the probe texts."""
    specials = [int(i) for i in (getattr(tokenizer, "all_special_ids", None) or [])][:2]
    raw, full = _decoder(tokenizer, backend), _decoder(tokenizer, None)
    cleanup = getattr(tokenizer, "clean_up_tokenization", None)
    probes = [specials + list(backend.encode(t, add_special_tokens=False).ids) + specials for t in PROBE_TEXTS]
    same = all(raw(ids) == full(ids) for ids in probes)
    clean = not same and callable(cleanup) and all(cleanup(raw(ids)) == full(ids) for ids in probes)
    if not same and not clean:
        return _Plan(stream=False, backend=False, clean=False)
    for ids in probes:
        source = _StreamSource(backend)
        if "".join(source.step(i) for i in ids) != raw(ids):
            return _Plan(stream=False, backend=True, clean=clean)
    return _Plan(stream=True, backend=True, clean=clean)


def _plan(tokenizer: Any) -> _Plan:
    """How `tokenizer` is detokenized (memoized per tokenizer object)."""
    try:
        return _plans[tokenizer]
    except (KeyError, TypeError):
        pass
    backend = _backend(tokenizer)
    plan = _Plan(stream=False, backend=False, clean=False)
    if backend is not None:
        try:
            plan = _check(tokenizer, backend)
        except Exception as exc:  # noqa: BLE001 - any failure means: do not trust the fast path
            log.warning("incremental decode self-check of %s failed (%s)", type(tokenizer).__name__, exc)
        if not plan.stream:
            log.info("%s: DecodeStream differs from decode(); using the window method", type(tokenizer).__name__)
    try:
        _plans[tokenizer] = plan
    except TypeError:  # not weak-referenceable: checked again next time
        pass
    return plan


@dataclass(frozen=True)
class DetokState:
    """What a `TextStream` has seen and emitted, to continue it elsewhere (live migration; picklable)."""

    ids: list[int]  # every id pushed
    text: str  # emitted so far
    held: str  # decoded, held back (a possible start of a stop string)
    stopped: bool
    unclean: str  # raw text the piecewise clean-up has not released yet


class TextStream:
    """Turns generated token ids, pushed as they come, into text deltas, cutting at the first stop string.

    Text ending in an incomplete UTF-8 sequence, or in a prefix of a stop string, is held back until
    the next token decides it. `text` is what was emitted so far and is never revised. Only where the
    full decode itself revises earlier text (a byte-fallback run that turns out invalid UTF-8 becomes
    one U+FFFD per byte, also for bytes that decoded fine alone) can the final text differ from it;
    `flush` then appends the full decode's rest after the emitted length and logs it.
    """

    def __init__(self, tokenizer: Any, stops: list[str]) -> None:
        self.tokenizer, self.stops = tokenizer, [s for s in stops if s]
        self.text = ""
        self.stopped = False
        self._ids: list[int] = []  # every id pushed: `flush` decodes them once
        self._held = ""  # decoded text not emitted yet: a possible start of a stop string
        plan = _plan(tokenizer)
        backend = _backend(tokenizer) if plan.backend else None
        self._raw = _decoder(tokenizer, backend)
        self._source: _StreamSource | _WindowSource = (
            _StreamSource(backend) if plan.stream else _WindowSource(self._raw))
        self._cleaner = _Cleaner(tokenizer.clean_up_tokenization) if plan.clean else None
        self._raw_len = 0  # characters the source produced so far

    def push(self, new_ids: list[int]) -> str:
        """Take the ids generated since the last call; return the text that is now safe to emit."""
        if self.stopped:
            return ""
        pieces = []
        for i in new_ids:
            self._ids.append(int(i))
            try:
                piece = self._source.step(int(i))
            except Exception as exc:  # noqa: BLE001 - DecodeStream raises a bare Exception on a prefix mismatch
                log.debug("incremental decode resynchronized at id %d: %s", len(self._ids) - 1, exc)
                piece = self._resync()
            self._raw_len += len(piece)
            pieces.append(piece)
        piece = "".join(pieces)
        if self._cleaner is not None:
            piece = self._cleaner.feed(piece)
        return self._advance(piece, final=False)

    def export(self) -> DetokState:
        """Its state, for `resume` on another instance."""
        return DetokState(list(self._ids), self.text, self._held, self.stopped,
                          self._cleaner.raw if self._cleaner is not None else "")

    @classmethod
    def resume(cls, tokenizer: Any, stops: list[str], state: DetokState) -> TextStream:
        """A stream continuing `state`: the decoder replays its ids (emitting nothing), then text, held text and
        clean-up carry over, so the next pushes give the deltas the original stream would have given."""
        ts = cls(tokenizer, stops)
        for i in state.ids:
            ts._ids.append(int(i))
            try:
                ts._raw_len += len(ts._source.step(int(i)))
            except Exception:  # noqa: BLE001 - as in `push`: continue with the window method
                ts._raw_len += len(ts._resync())
        ts.text, ts._held, ts.stopped = state.text, state.held, state.stopped
        if ts._cleaner is not None:
            ts._cleaner.raw = state.unclean
        return ts

    def flush(self) -> str:
        """At the end of generation: the held-back rest ("" if stopped)."""
        if self.stopped:
            return ""
        full = self.tokenizer.decode(self._ids, skip_special_tokens=True) if self._ids else ""
        seen = self.text + self._held
        if not full.startswith(seen):
            log.info("the full decode revised streamed text (invalid byte-fallback run?); appending its rest")
            seen, self._held = self.text, ""
        return self._advance(full[len(seen):], final=True)

    def _resync(self) -> str:
        """Continue with the window method from a full raw decode (rare: only after the fast path failed)."""
        ids = self._ids
        read = len(ids)
        text = self._raw(ids)
        while text.endswith(REPLACEMENT) and read > 0 and len(ids) - read < 4:  # hold an incomplete character
            read -= 1
            text = self._raw(ids[:read])
        if text.endswith(REPLACEMENT):  # invalid bytes, not a partial character: they stay as decoded
            read, text = len(ids), self._raw(ids)
        self._source = _WindowSource(self._raw, ids, read)
        return text[self._raw_len:]

    def _advance(self, piece: str, *, final: bool) -> str:
        """Append `piece` to the held text, cut at a stop, emit all but a possible stop prefix."""
        # A stop cannot start in emitted text: at emission no suffix of it was a prefix of any stop.
        tail = self._held + piece
        cut = min((i for i in (tail.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped, self._held = True, ""
            return self._emit(tail[:cut])
        keep = 0 if final else self._stop_prefix(tail)
        self._held = tail[len(tail) - keep:]
        return self._emit(tail[:len(tail) - keep])

    def _stop_prefix(self, tail: str) -> int:
        """Length of the longest end of `tail` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(tail)), best, -1):
                if tail.endswith(s[:k]):
                    best = k
                    break
        return best

    def _emit(self, delta: str) -> str:
        self.text += delta
        return delta
