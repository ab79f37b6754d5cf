"""Which pieces have landed whole, and verified, while reader threads deliver their bytes in any order.

A verified piece is checked in *spans*: each block of `Piece.block_bytes`
against its block hash when the index has them (`Piece.blocks`), else the
whole piece against its identity hash (`Piece.hash`). A span is streamed
through xxh3-128 in order, from the host bytes the delivering thread holds
(the destination on CPU, the pinned staging chunk on CUDA, so the bytes hashed
are the bytes copied). A thread with a later part of a span waits until the
earlier part has been hashed by the thread that read it; a part that starts a
span never waits, so with blocks every reader thread hashes its own chunks at
once. Such a wait is short and cannot deadlock: reader threads take chunks in
plan order, so the earlier part is already being read by a running thread. A
span is checked by the thread that hashes its last byte (a mismatch raises
HashMismatchError naming the file, the tensor and the bytes), so a piece is
reported whole only once every span matched. A piece without a hash is whole
when its bytes are in.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xxhash

from tangram.store.errors import HashMismatchError
from tangram.store.plan import Piece


class Aborted(Exception):
    """Another reader thread of the same load failed; this one stops waiting."""


@dataclass
class _Span:
    """Bytes [start, end) of a piece, checked against one expected digest."""

    start: int
    end: int
    expected: str
    pos: int  # bytes before this offset have been hashed (starts at `start`)
    waiting: int = 0  # threads waiting for `pos` to move
    hasher: Any = field(default_factory=xxhash.xxh3_128)


def _spans(piece: Piece) -> list[_Span]:
    if piece.blocks:
        b = piece.block_bytes
        return [_Span(k * b, min((k + 1) * b, piece.nbytes), h, k * b) for k, h in enumerate(piece.blocks)]
    return [_Span(0, piece.nbytes, piece.hash, 0)] if piece.hash is not None else []


class Feed:
    """The right, held by one thread, to hash a piece's bytes from `at` on, in order (Landing.hold)."""

    def __init__(self, landing: Landing, piece: Piece, spans: list[_Span], at: int) -> None:
        self._landing, self._piece, self._spans, self.at = landing, piece, spans, at
        self._k = landing.span_index(piece, spans, at)

    def update(self, data: torch.Tensor | np.ndarray) -> None:
        """Hash the next bytes of the piece (flat uint8, host memory); checks every span they complete."""
        view = memoryview(data.numpy() if isinstance(data, torch.Tensor) else data)
        done = 0
        while done < len(view):
            span = self._spans[self._k]
            take = min(len(view) - done, span.end - self.at)
            span.hasher.update(view[done : done + take])
            done += take
            self.at += take
            if self.at == span.end:
                self._landing.check(self._piece, span)
                self._k += 1
            self._landing.advance(span, self.at)


class Landing:
    """Thread-safe per-piece bookkeeping of delivered bytes, with in-order hashing of verified spans."""

    def __init__(self, pieces: Iterable[Piece], path_of: Callable[[int], Path]) -> None:
        self._path_of = path_of
        self._cond = threading.Condition()
        self._aborted = False
        self._left: dict[int, int] = {}
        self._spans: dict[int, list[_Span]] = {}
        self._events: dict[int, list[Any]] = {}
        self._names: dict[int, str] = {}
        for p in pieces:
            if id(p) in self._left:
                continue
            self._names[id(p)] = p.name
            self._left[id(p)] = p.nbytes
            self._events[id(p)] = []
            if spans := _spans(p):
                self._spans[id(p)] = spans

    def arrived(self, piece: Piece, start: int, data: torch.Tensor | None, event: Any = None) -> list[Any] | None:
        """Bytes [start, start + n) of `piece` are in its destination (or being copied there, with `event`).

        `data` holds those bytes in host memory (flat uint8; needed when the piece
        is verified, else only its length counts). Returns None while the piece
        is incomplete, else the events of all its copies (wait on them before
        using it on a device). Raises HashMismatchError when the bytes complete a
        span whose digest differs from the index.
        """
        n = data.numel() if data is not None else 0
        feed = self.hold(piece, start)
        if feed is not None and n:
            assert data is not None, "a verified piece needs its bytes"
            feed.update(data)
        return self.release(piece, n, event)

    def hold(self, piece: Piece, start: int) -> Feed | None:
        """Wait until the bytes of `piece`'s span before `start` are hashed; return the feed that hashes on from
        `start` (None: not verified). The caller alone then feeds it the piece's next bytes, in order, and calls
        `release` with how many it fed (`arrived` does both for one part)."""
        spans = self._spans.get(id(piece))
        if spans is None:
            return None
        span = spans[self.span_index(piece, spans, start)]
        with self._cond:
            while span.pos != start and not self._aborted:
                span.waiting += 1
                try:
                    self._cond.wait()
                finally:
                    span.waiting -= 1
            if self._aborted:
                raise Aborted()
        return Feed(self, piece, spans, start)

    @staticmethod
    def span_index(piece: Piece, spans: list[_Span], at: int) -> int:
        """Index of the span holding byte `at` of `piece` (the last span for `at == nbytes`)."""
        return min(at // piece.block_bytes, len(spans) - 1) if piece.blocks else 0

    def ready(self, piece: Piece, start: int) -> bool:
        """Whether `hold(piece, start)` would return at once (the bytes before `start` are hashed, or none need)."""
        spans = self._spans.get(id(piece))
        if spans is None:
            return True
        with self._cond:
            return spans[self.span_index(piece, spans, start)].pos == start

    def advance(self, span: _Span, pos: int) -> None:
        """`span` is hashed up to `pos` (Feed); wakes the threads waiting for it."""
        with self._cond:
            span.pos = pos
            if span.waiting:  # one condition serves every span: wake threads only when one waits for this
                self._cond.notify_all()

    def check(self, piece: Piece, span: _Span) -> None:
        """Compare a fully hashed span with the index (HashMismatchError when it differs)."""
        got = span.hasher.hexdigest()
        if got != span.expected:
            where = f"bytes {span.start}..{span.end}" if piece.blocks else "content"
            raise HashMismatchError(self._path_of(piece.file), f"tensor {piece.name!r}: {where} hash {got} differs "
                                    f"from the index ({span.expected}); the data file is corrupt")

    def release(self, piece: Piece, n: int, event: Any = None) -> list[Any] | None:
        """`n` more bytes of `piece` are in (hashed through its feed, when verified); returns as `arrived` does."""
        key = id(piece)
        with self._cond:
            if event is not None:
                self._events[key].append(event)
            self._left[key] -= n
            if self._left[key] > 0:
                return None
            return self._events.pop(key, [])

    def arrived_unhashed(self, piece: Piece, nbytes: int, event: Any = None) -> list[Any] | None:
        """Like `arrived` for bytes that need no check (host-cache hits, verified when cached)."""
        return self.release(piece, nbytes, event)

    def incomplete(self) -> list[str]:
        """Names of the pieces not yet whole (and verified): none once a load has delivered every byte."""
        with self._cond:
            return [self._names[k] for k, left in self._left.items() if left > 0]

    def abort(self) -> None:
        """Wake every waiting thread with Aborted (a reader failed: the load is over)."""
        with self._cond:
            self._aborted = True
            self._cond.notify_all()
