"""Which pieces have landed whole, and verified, while reader threads deliver their bytes in any order.

A piece with an expected hash (`Piece.hash`) is streamed through xxh3-128 in
file order, from the host bytes the delivering thread holds (the destination
on CPU, the pinned staging chunk on CUDA, so the bytes hashed are the bytes
copied): a thread with a later part of a piece waits until the earlier part
has been hashed by the thread that read it. Such a wait is short and cannot
deadlock: reader threads take chunks in plan order, so the earlier part is
already being read by a running thread. With `defer` (CPU destinations, whose
bytes stay put) a later part does not wait: it is set aside, and the thread
that hashes up to its start hashes it next, so a tensor larger than a chain
is copied by several threads at once while one hashes it. A piece is reported
whole only once its digest matched (by the thread that hashed its last bytes);
a mismatch raises HashMismatchError naming the file and the tensor. A piece
without an expected hash is whole when its bytes are in.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import xxhash

from tangram.store.errors import HashMismatchError
from tangram.store.plan import Piece


class Aborted(Exception):
    """Another reader thread of the same load failed; this one stops waiting."""


class Landing:
    """Thread-safe per-piece bookkeeping of delivered bytes, with in-order hashing of verified pieces."""

    def __init__(self, pieces: Iterable[Piece], path_of: Callable[[int], Path], *, defer: bool = False) -> None:
        """`defer`: a verified part that arrives before the bytes ahead of it were hashed is kept (its `data`
        must stay valid until the load ends) and hashed by whoever gets there, instead of waiting."""
        self._path_of = path_of
        self._defer = defer
        self._stash: dict[int, dict[int, torch.Tensor]] = {}  # deferred parts per piece, by start
        self._cond = threading.Condition()
        self._aborted = False
        self._left: dict[int, int] = {}
        self._pos: dict[int, int] = {}
        self._hashers: dict[int, Any] = {}
        self._events: dict[int, list[Any]] = {}
        self._waiting: dict[int, int] = {}  # threads waiting in `hold`, per piece
        self._names: dict[int, str] = {}
        for p in pieces:
            if id(p) in self._left:
                continue
            self._names[id(p)] = p.name
            self._left[id(p)] = p.nbytes
            self._events[id(p)] = []
            if p.hash is not None:
                self._pos[id(p)] = 0
                self._hashers[id(p)] = xxhash.xxh3_128()

    def arrived(self, piece: Piece, start: int, data: torch.Tensor | None, event: Any = None) -> list[Any] | None:
        """Bytes [start, start + n) of `piece` are in its destination (or being copied there, with `event`).

        `data` holds those bytes in host memory (flat uint8; needed when the piece
        is verified, else only its length counts). Returns None while the piece
        is incomplete, else the events of all its copies (wait on them before
        using it on a device). Raises HashMismatchError when the last byte of a
        verified piece arrives and its digest differs from the index.
        """
        n = data.numel() if data is not None else 0
        if self._defer and id(piece) in self._hashers:
            assert data is not None, "a verified piece needs its bytes"
            with self._cond:
                if self._aborted:
                    raise Aborted()
                if self._pos[id(piece)] != start:
                    self._stash.setdefault(id(piece), {})[start] = data  # the thread that gets here hashes it
                    return None
        hasher = self.hold(piece, start)
        if hasher is not None:
            assert data is not None, "a verified piece needs its bytes"
            if n:
                hasher.update(memoryview(data.numpy()))  # only this thread is at this position of the piece
        return self.release(piece, n, event)

    def hold(self, piece: Piece, start: int) -> Any | None:
        """Wait until the bytes of `piece` before `start` are hashed; return its hasher (None: not verified).

        The caller alone then feeds the hasher the piece's next bytes, in order, and
        calls `release` with how many it fed (`arrived` does both for one part).
        """
        hasher = self._hashers.get(id(piece))
        if hasher is not None:
            key = id(piece)
            with self._cond:
                while self._pos[key] != start and not self._aborted:
                    self._waiting[key] = self._waiting.get(key, 0) + 1
                    try:
                        self._cond.wait()
                    finally:
                        self._waiting[key] -= 1
                if self._aborted:
                    raise Aborted()
        return hasher

    def ready(self, piece: Piece, start: int) -> bool:
        """Whether `hold(piece, start)` would return at once (the bytes before `start` are hashed, or none need)."""
        key = id(piece)
        if key not in self._hashers:
            return True
        with self._cond:
            return self._pos[key] == start

    def release(self, piece: Piece, n: int, event: Any = None) -> list[Any] | None:
        """`n` more bytes of `piece` are in (fed to its hasher since `hold`); returns as `arrived` does."""
        key = id(piece)
        hasher = self._hashers.get(key)
        total = n
        while hasher is not None:
            with self._cond:
                self._pos[key] += n
                if self._waiting.get(key):  # one condition serves every piece: wake threads only for this one
                    self._cond.notify_all()
                later = self._stash.get(key, {}).pop(self._pos[key], None) if not self._aborted else None
            if later is None:
                break
            n = later.numel()  # a part that arrived early: this thread is now at its position
            hasher.update(memoryview(later.numpy()))
            total += n
        return self._count(piece, total, event)

    def arrived_unhashed(self, piece: Piece, nbytes: int, event: Any = None) -> list[Any] | None:
        """Like `arrived` for bytes that need no check (host-cache hits, verified when cached)."""
        return self._count(piece, nbytes, event)

    def _count(self, piece: Piece, n: int, event: Any) -> list[Any] | None:
        key = id(piece)
        with self._cond:
            if event is not None:
                self._events[key].append(event)
            self._left[key] -= n
            if self._left[key] > 0:
                return None
            events = self._events.pop(key, [])
        hasher = self._hashers.pop(key, None)
        if hasher is not None:
            got = hasher.hexdigest()
            if got != piece.hash:
                raise HashMismatchError(self._path_of(piece.file), f"tensor {piece.name!r}: content hash {got} "
                                        f"differs from the index ({piece.hash}); the data file is corrupt")
        return events

    def incomplete(self) -> list[str]:
        """Names of the pieces not yet whole (and verified): none once a load has delivered every byte."""
        with self._cond:
            return [self._names[k] for k, left in self._left.items() if left > 0]

    def abort(self) -> None:
        """Wake every waiting thread with Aborted (a reader failed: the load is over)."""
        with self._cond:
            self._aborted = True
            self._cond.notify_all()
