"""Progress bars (rich) for byte-counted work a user waits on."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)


@contextmanager
def byte_progress(description: str, total: int | None, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """Yield a thread-safe `advance(nbytes)` callback that drives a bar (or does nothing when disabled)."""
    if not enabled:
        yield lambda n: None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)
