"""Warm vLLM shells of one device pool, by shape: a stopped instance's engine waits for the next start of a model
it can serve by re-binding weights (TIDAL's templates, for vLLM: imports, model build and KV set-up are done).

A shell serves any checkpoint with the same `shell_key`: architecture and shapes (config.json less its names),
tokenizer and generation defaults (vLLM detokenizes and stops with them), the engine's arguments, the device.
A family of fine-tunes of one base shares one kind of shell.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import json
import logging
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

from tangram.paths import file_version
from tangram.vllm.shell import Shell

log = logging.getLogger(__name__)
NAME_KEYS = {"_name_or_path", "name_or_path", "transformers_version"}  # config.json entries that are not shape
SHELL_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
               "vocab.json", "merges.txt", "tokenizer.model")


@functools.lru_cache(maxsize=256)
def _digest(path: Path, version: tuple[int, int, int]) -> bytes:
    """sha256 of a file's bytes, once per version of the file (`tangram.paths.file_version`)."""
    return hashlib.sha256(path.read_bytes()).digest()


def shell_key(checkpoint: Path, engine_args: dict, device: str) -> str:
    """What a shell built for `checkpoint` with `engine_args` on `device` can serve, as a short hex digest."""
    h = hashlib.sha256()
    config = json.loads((checkpoint / "config.json").read_text())
    h.update(json.dumps({k: v for k, v in config.items() if k not in NAME_KEYS}, sort_keys=True).encode())
    h.update(json.dumps({k: v for k, v in engine_args.items() if k not in ("model", "tokenizer")},
                        sort_keys=True, default=str).encode())
    h.update(device.encode())
    for name in SHELL_FILES:
        f = checkpoint / name
        version = file_version(f)
        if version is not None:
            h.update(name.encode())
            h.update(_digest(f, version))
    return h.hexdigest()[:16]


class ShellPool:
    """Parked shells by key; at most `per_key` of a key and `total` in all (the oldest is stopped first)."""

    def __init__(self, per_key: int = 1, total: int = 2) -> None:
        self.per_key, self.total = per_key, total
        self._parked: list[Shell] = []
        self._building: dict[str, Future] = {}  # pre-warms under way, by key
        self._out: dict[str, int] = {}  # shells of a key serving an instance now (taken or spawned, not yet back)
        self._lock = threading.Lock()

    def prewarm(self, key: str, build: Callable[[], Shell]) -> bool:
        """Build a shell of `key` on a thread and park it, unless one is parked, being built or serving (a re-deploy
        of a running deployment must not start a second vLLM process beside it); whether it began. A failed build
        is logged (the next start spawns its own and reports the error)."""
        with self._lock:
            if key in self._building or self._out.get(key) or any(s.key == key for s in self._parked):
                return False
            fut: Future = Future()
            self._building[key] = fut

        def run() -> None:
            try:
                shell = build()
            except Exception as exc:  # noqa: BLE001 - a pre-warm is best effort; starts report their own errors
                log.warning("pre-warming a vLLM shell failed: %s", exc)
                shell = None
            with self._lock:
                self._building.pop(key, None)
            if shell is not None:
                self.park(shell)
            fut.set_result(shell)

        threading.Thread(target=run, name=f"vllm-prewarm-{key}", daemon=True).start()
        return True

    def take(self, key: str) -> Shell | None:
        """A live parked shell of `key` (waiting for one being pre-warmed), removed from the pool, or None."""
        with self._lock:
            pending = self._building.get(key)
        if pending is not None:
            pending.result()  # its build ends in a ready shell or an error; either way no second build races it
        with self._lock:
            for shell in list(self._parked):
                if shell.key == key:
                    self._parked.remove(shell)
                    if shell.alive():
                        self._out[key] = self._out.get(key, 0) + 1
                        return shell
        return None

    def serving(self, key: str) -> None:
        """A shell of `key` that did not come from `take` (a new spawn) serves an instance now."""
        with self._lock:
            self._out[key] = self._out.get(key, 0) + 1

    def done(self, key: str) -> None:
        """A shell of `key` stopped serving its instance (then parked, or stopped)."""
        with self._lock:
            self._out[key] = max(0, self._out.get(key, 0) - 1)

    def park(self, shell: Shell) -> None:
        """Keep an idle shell for the next start of its key (a dead one, or one over the limits, is stopped)."""
        if not shell.alive():
            shell.kill()
            return
        with self._lock:
            self._parked.append(shell)
            same = [s for s in self._parked if s.key == shell.key]
            drop = same[: max(0, len(same) - self.per_key)]
            rest = [s for s in self._parked if s not in drop]
            drop += rest[: max(0, len(rest) - self.total)]
            self._parked = [s for s in self._parked if s not in drop]
        for s in drop:
            log.info("stopping parked vLLM shell %d (over the warm-shell limits)", s.proc.pid)
            s.stop()

    def parked(self) -> int:
        """Shells waiting here (not counting those being built)."""
        with self._lock:
            return len(self._parked)

    def close(self) -> None:
        """Stop every parked shell."""
        with self._lock:
            shells, self._parked = self._parked, []
        for s in shells:
            s.stop()


_POOLS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_POOLS_LOCK = threading.Lock()


def shells_for(pool) -> ShellPool:
    """The warm shells of one device pool."""
    with _POOLS_LOCK:
        found = _POOLS.get(pool)
        if found is None:
            found = _POOLS[pool] = ShellPool()
        return found


@atexit.register
def _close_all() -> None:
    for shells in list(_POOLS.values()):
        shells.close()
