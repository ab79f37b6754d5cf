"""When read speed is measured: on demand, after install/convert, and at server start in the background.

Never inside a load (probe.py answers loads at once). For each filesystem that
has no remembered answer, the probe reads the largest data file of a
checkpoint on it; the data dir's filesystem, where none is large enough, gets a
temporary probe file of TEMP_PROBE_BYTES (random bytes, removed afterwards).
`TANGRAM_PROBE=off` turns the automatic measurements off (`tangram probe`
still measures).
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from tangram.paths import data_dir
from tangram.store import probe
from tangram.store.errors import CheckpointError
from tangram.store.format import INDEX_FILE, Checkpoint
from tangram.store.probe import MIN_PROBE_BYTES, ProbeResult, Progress

log = logging.getLogger(__name__)

ENV_PROBE = "TANGRAM_PROBE"
TEMP_PROBE_BYTES = 128 << 20
TEMP_PREFIX = ".read-probe-"
shutting_down = threading.Event()  # set at interpreter exit: a daemon probe cut short then is not an error
atexit.register(shutting_down.set)


def auto_enabled() -> bool:
    """Whether automatic measurements may run (not turned off, and no read method forced)."""
    if os.environ.get(ENV_PROBE, "").strip().lower() in ("off", "0", "false", "no"):
        return False
    try:
        return probe.forced_method() is None
    except ValueError:
        return False  # a bad TANGRAM_READ_METHOD is reported by the first load


def data_files(path: Path) -> list[Path]:
    """The checkpoint data files at `path`: the file itself, or those of every checkpoint at or below a directory
    (as each checkpoint's index names them; an unreadable checkpoint is skipped)."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        return []
    out: list[Path] = []
    for index in path.rglob(INDEX_FILE):
        try:
            out.extend(f for f in Checkpoint(index.parent).data_files() if f.is_file())
        except CheckpointError:
            continue
    return out


def pending(paths: Iterable[Path]) -> dict[int, list[Path]]:
    """The filesystems (st_dev) of `paths` with no remembered measurement, each with the paths on it."""
    out: dict[int, list[Path]] = {}
    for p in paths:
        try:
            dev = os.stat(p).st_dev
            if probe.remembered(p) is None:
                out.setdefault(dev, []).append(p)
        except OSError:
            continue
    return out


@contextmanager
def temporary_probe_file(directory: Path, nbytes: int = TEMP_PROBE_BYTES) -> Iterator[Path]:
    """A file of `nbytes` random bytes in `directory`, synced to disk, removed on exit."""
    for stale in directory.glob(f"{TEMP_PREFIX}*.bin"):  # left by a process that ended mid-probe
        pid = stale.name[len(TEMP_PREFIX):-4]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            stale.unlink(missing_ok=True)
    path = directory / f"{TEMP_PREFIX}{os.getpid()}.bin"
    try:
        with open(path, "wb") as fh:
            for _ in range(0, nbytes, 8 << 20):
                fh.write(os.urandom(8 << 20))
            fh.flush()
            os.fsync(fh.fileno())
        yield path
    finally:
        path.unlink(missing_ok=True)


def measure_filesystems(paths: Sequence[Path], *, temp_dir: Path | None = None, force: bool = False,
                        progress: Progress | None = None) -> list[ProbeResult]:
    """Measure each filesystem of `paths` (and of `temp_dir`) that has no answer yet, or all with `force`.

    A filesystem is measured on its largest data file of at least MIN_PROBE_BYTES
    among `paths`; without one, on a temporary probe file when it is `temp_dir`'s,
    else it is skipped (loads there keep the default).
    """
    every = [*paths, *([temp_dir] if temp_dir is not None else [])]
    if force:
        devs: dict[int, list[Path]] = {}
        for p in every:
            if p.exists():
                devs.setdefault(os.stat(p).st_dev, []).append(p)
    else:
        devs = pending(every)
    results = []
    for dev, on_dev in devs.items():
        files = [f for p in on_dev for f in data_files(p) if f.stat().st_size >= MIN_PROBE_BYTES]
        if files:
            results.append(probe.measure(max(files, key=lambda f: f.stat().st_size), progress))
        elif temp_dir is not None and temp_dir.exists() and os.stat(temp_dir).st_dev == dev:
            with temporary_probe_file(temp_dir) as tmp:
                results.append(probe.measure(tmp, progress))
        else:
            log.info("no data file of %d MiB or more on device %s: its loads use %s", MIN_PROBE_BYTES >> 20, dev,
                     probe.DEFAULT.label)
    return results


def _unmeasured(checkpoints: Iterable[Path]) -> list[Path] | None:
    """`checkpoints` as paths when the probe is on and their filesystems or the data dir's lack an answer."""
    if not auto_enabled():
        return None
    paths = [Path(c) for c in checkpoints]
    return paths if pending([data_dir(), *paths]) else None


def measure_pending(checkpoints: Iterable[Path]) -> list[ProbeResult]:
    """Measure now what a server started with `checkpoints` would measure in the background (nothing when it is
    known, or the probe is off): a benchmark calls this before it times anything."""
    paths = _unmeasured(checkpoints)
    return measure_filesystems(paths, temp_dir=data_dir()) if paths is not None else []


def probe_in_background(checkpoints: Iterable[Path]) -> threading.Thread | None:
    """At server start: measure, on a daemon thread, the filesystems of the data dir and of `checkpoints` that
    have no answer yet; loads meanwhile use the default. None when there is nothing to do."""
    paths = _unmeasured(checkpoints)
    if paths is None:
        return None
    root = data_dir()

    def run() -> None:
        try:
            for r in measure_filesystems(paths, temp_dir=root):
                log.info("read speed measured in the background: %s on %s", r.config.label, r.measured_on)
        except Exception:  # noqa: BLE001 - a failed probe leaves the default in place; serving goes on
            if sys.is_finalizing() or shutting_down.is_set() or "interpreter shutdown" in str(sys.exc_info()[1]):
                # the process is exiting mid-probe (its reader pool refuses new work): nothing is lost
                log.debug("background read-speed probe stopped by the process's exit", exc_info=True)
                return
            log.exception("background read-speed probe failed; loads keep %s", probe.DEFAULT.label)

    thread = threading.Thread(target=run, name="tangram-read-probe", daemon=True)
    thread.start()
    return thread
