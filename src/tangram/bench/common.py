"""Helpers shared by every benchmark: host facts, statistics, the result file, tables and progress."""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from tangram.cli_common import auto_device

log = logging.getLogger(__name__)


def resolve_device(device: str = "auto") -> torch.device:
    """"auto" -> cuda:0 when CUDA is available, else cpu; cpu, cuda or cuda:N as torch parses them.

    Raises ValueError for another device type, or for CUDA where this torch sees no such CUDA device.
    """
    device = auto_device(device)  # the CLI's one rule for "auto"
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"device {device!r}: {exc}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r}: the benchmarks run on cpu or cuda[:N]")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: CUDA is not available here (torch {torch.__version__}, "
                             f"built for CUDA {torch.version.cuda})")
        dev = torch.device("cuda", 0 if dev.index is None else dev.index)
        if dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    return dev


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _mem_total_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def host_info() -> dict[str, Any]:
    """Facts about the machine a result was measured on (no host name)."""
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": _cpu_model(),
        "mem_total_bytes": _mem_total_bytes(),
        "os": f"{platform.system()} {platform.release()}",
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
    }
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def package_versions(names: Sequence[str]) -> dict[str, str | None]:
    """Installed version of each distribution name (None when not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def median(values: Sequence[float]) -> float | None:
    """Median of `values`, None when empty."""
    return statistics.median(values) if values else None


def gbps(nbytes: int, seconds: float | None) -> float | None:
    """Decimal GB/s, None when there is no time."""
    if not seconds or seconds <= 0:
        return None
    return nbytes / seconds / 1e9


def ratio(num: float | None, den: float | None) -> float | None:
    """num / den rounded to 3 decimals, None when either is missing or den is 0."""
    if num is None or den is None or den == 0:
        return None
    return round(num / den, 3)


def result_doc(bench: str, device: torch.device | str, config: Mapping[str, Any], rows: list[dict[str, Any]],
               summary: Mapping[str, Any]) -> dict[str, Any]:
    """A benchmark result in the common JSON shape."""
    return {
        "bench": bench,
        "device": str(device),
        "host": host_info(),
        "config": dict(config),
        "rows": rows,
        "summary": dict(summary),
    }


def write_result(result: Mapping[str, Any], path: str | Path) -> Path:
    """Write a result as indented JSON (atomically: temp file then rename); return the path."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(result, indent=1, default=str) + "\n")
    os.replace(tmp, target)
    log.info("wrote %s", target)
    return target


@dataclass(frozen=True)
class Column:
    """One table column: a row key, its header and how to format a value."""

    key: str
    header: str
    fmt: Callable[[Any], str] = str
    justify: str = "right"


def fmt_num(digits: int = 2) -> Callable[[Any], str]:
    """Formatter for floats with `digits` decimals ("-" for None)."""
    return lambda v: "-" if v is None else f"{v:.{digits}f}"


def fmt_bytes(v: Any) -> str:
    """Human bytes (decimal units)."""
    if v is None:
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if v >= scale:
            return f"{v / scale:.2f} {unit}"
    return f"{v} B"


def print_table(console: Console, title: str, columns: Sequence[Column], rows: Sequence[Mapping[str, Any]]) -> None:
    """Print rows as a rich table; missing keys show as "-"."""
    table = Table(title=title, title_justify="left")
    for col in columns:
        table.add_column(col.header, justify=col.justify)  # type: ignore[arg-type]
    for row in rows:
        table.add_row(*[col.fmt(row[col.key]) if row.get(col.key) is not None else "-" for col in columns])
    console.print(table)


def print_summary(console: Console, title: str, summary: Mapping[str, Any]) -> None:
    """Print a summary mapping (nested mappings flattened with dots) as a two-column table."""
    table = Table(title=title, title_justify="left")
    table.add_column("key", justify="left")
    table.add_column("value", justify="right")

    def walk(prefix: str, value: Any) -> Iterator[tuple[str, Any]]:
        if isinstance(value, Mapping):
            for k, v in value.items():
                yield from walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            yield prefix, value

    for key, value in walk("", summary):
        table.add_row(key, "null" if value is None else (f"{value:.3f}" if isinstance(value, float) else str(value)))
    console.print(table)


class StepProgress:
    """A counted-steps progress bar whose description says what runs now."""

    def __init__(self, progress: Progress | None, task: int | None) -> None:
        self._progress = progress
        self._task = task

    def describe(self, text: str) -> None:
        """Show `text` as the current step."""
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, description=text)

    def advance(self, steps: int = 1) -> None:
        """Count `steps` steps done."""
        if self._progress is not None and self._task is not None:
            self._progress.advance(self._task, steps)

    def add_total(self, steps: int) -> None:
        """Grow the total by `steps` (work discovered later)."""
        if self._progress is not None and self._task is not None:
            task = self._progress.tasks[self._task]
            self._progress.update(self._task, total=(task.total or 0) + steps)


@contextmanager
def step_progress(console: Console, total: int, description: str = "", enabled: bool = True) -> Iterator[StepProgress]:
    """A progress bar over `total` steps on `console` (a no-op when disabled)."""
    if not enabled:
        yield StepProgress(None, None)
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(description, total=total)
        yield StepProgress(bar, task)
