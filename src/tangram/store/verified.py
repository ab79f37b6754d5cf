"""What this process has verified: byte ranges of data files whose hash matched, valid while the file is unchanged.

A load hashes every tensor it reads (landing.py). Hashing the same bytes of the
same file again proves nothing new as long as the file has not changed since,
and on a warm load it costs as much as the copy itself (2-core VM: 0.5-1.0x the
load time). A range is remembered only after a load verified it, keyed by the
file's `FileStamp` (device, inode, size, mtime and ctime in nanoseconds, taken
before the read and again after it): any write, truncation, rename over it or
`touch` moves the ctime, which user space cannot set back, so the next load
hashes again. A file whose ctime is younger than `settle_s` is not remembered:
timestamps advance in coarse ticks, and a write in the same tick as the one
before would leave the stamp as it was (git's "racy" index entries, the same
rule). `TANGRAM_REVERIFY=1` (or `Loader(reverify=True)`) hashes every read again.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

SETTLE_S = 1.0  # a file changed less than this long ago is not trusted yet (timestamp ticks)


@dataclass(frozen=True)
class FileStamp:
    """The identity of a file's contents as the filesystem reports it."""

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, path: Path | str) -> FileStamp:
        """The stamp of `path` now (OSError when it is gone)."""
        st = os.stat(path)
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass(frozen=True)
class Range:
    """Bytes [offset, offset + nbytes) of a data file whose xxh3-128 digest is `digest`."""

    offset: int
    nbytes: int
    digest: str


class VerifiedRanges:
    """Thread-safe memory of verified ranges, one entry per file (a new stamp replaces the old entry)."""

    def __init__(self, settle_s: float = SETTLE_S, clock_ns: Callable[[], int] = time.time_ns) -> None:
        self.settle_s, self._clock_ns = settle_s, clock_ns
        self._lock = threading.Lock()
        self._files: dict[tuple[int, int], tuple[FileStamp, set[Range]]] = {}

    def known(self, stamp: FileStamp, rng: Range) -> bool:
        """Whether `rng` of the file with `stamp` was verified by a load and the file is unchanged since."""
        with self._lock:
            entry = self._files.get((stamp.dev, stamp.ino))
            return entry is not None and entry[0] == stamp and rng in entry[1]

    def record(self, before: FileStamp, after: FileStamp, ranges: Iterable[Range]) -> bool:
        """Remember `ranges`, just verified by a load that stat'ed the file `before` and `after` it read them.

        Nothing is remembered (False) when the file changed during the load or too recently to be trusted."""
        if before != after or self._clock_ns() - after.ctime_ns < self.settle_s * 1e9:
            return False
        with self._lock:
            key = (after.dev, after.ino)
            entry = self._files.get(key)
            if entry is None or entry[0] != after:
                entry = self._files[key] = (after, set())
            entry[1].update(ranges)
        return True

    def forget(self) -> None:
        """Drop everything remembered: the next loads hash every byte they read."""
        with self._lock:
            self._files.clear()

    def __len__(self) -> int:
        with self._lock:
            return sum(len(r) for _, r in self._files.values())


VERIFIED = VerifiedRanges()  # the process's memory, shared by every Loader


def reverify_default() -> bool:
    """Whether loads hash every read even where this process verified the bytes before (TANGRAM_REVERIFY=1)."""
    return os.environ.get("TANGRAM_REVERIFY", "0") not in ("", "0", "false", "no")
