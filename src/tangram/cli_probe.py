"""`tangram probe`: measure how this machine's disks are read fastest; also run after convert and fetch-demo."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from tangram.store.probe import ProbeResult


def result_table(result: ProbeResult) -> Table:
    """Every candidate's best cold and warm GB/s, the score the choice minimises, and the choice."""
    from tangram.store.probe import _score

    table = Table(title=f"read speed of device {result.device} (measured on {result.measured_on}, "
                  f"{result.seconds:.1f} s)")
    for col in ("configuration", "cold GB/s", "warm GB/s", "s/GB cold+warm", ""):
        table.add_column(col, justify="left" if col in ("configuration", "") else "right")
    for label, g in sorted(result.gbps.items(), key=lambda kv: _score(kv[1])):
        mark = "[bold green]chosen[/]" if label == result.config.label else ""
        table.add_row(label, f"{g['cold']:.2f}", f"{g['warm']:.2f}", f"{_score(g):.3f}", mark)
    return table


def run_probe(path: Path, console: Console) -> list[ProbeResult]:
    """Measure the filesystem of `path` now (with a progress bar) and print the table of each one measured."""
    from tangram.store.probe_auto import measure_filesystems

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("measuring read speed", total=None)

        def advance(done: int, planned: int, label: str) -> None:
            bar.update(task, completed=done, total=planned, description=f"measuring read speed: {label}")

        results = measure_filesystems([path], temp_dir=path if path.is_dir() else path.parent, force=True,
                                      progress=advance)
    for r in results:
        console.print(result_table(r))
        console.print(f"[green]chosen[/] {r.config.label}; stored in the data dir's read_method.json")
    return results


def probe_after_install(path: Path, console: Console) -> None:
    """After a checkpoint was written: measure its filesystem if nothing is remembered (and probing is on)."""
    from tangram.store.probe_auto import auto_enabled, measure_filesystems

    if not auto_enabled():
        return
    try:
        with console.status("measuring how this disk is read fastest (once per filesystem)"):
            results = measure_filesystems([path])
    except (OSError, ValueError) as exc:
        console.print(f"[yellow]read-speed probe skipped[/]: {exc}", highlight=False)
        return
    for r in results:
        g = r.gbps[r.config.label]
        console.print(f"read configuration {r.config.label}: cold {g['cold']:.2f} GB/s, warm {g['warm']:.2f} GB/s "
                      "(`tangram probe` shows all)", highlight=False)


def register(app: typer.Typer, console: Console, fail) -> None:
    """Add the `probe` command to `app`."""

    @app.command()
    def probe(
        path: Annotated[Optional[Path], typer.Argument(
            help="A checkpoint, data file or directory on the filesystem to measure (default: the data dir).")]
        = None,
    ) -> None:
        """Measure which read method, threads and chunk size read this filesystem fastest, and remember it."""
        from tangram.paths import data_dir

        target = path if path is not None else data_dir()
        if not target.exists():
            fail(FileNotFoundError(f"{target}: no such file or directory"))
        try:
            results = run_probe(target, console)
        except (OSError, ValueError) as exc:
            fail(exc)
            return
        if not results:
            fail(ValueError(f"{target}: nothing to measure there"))
