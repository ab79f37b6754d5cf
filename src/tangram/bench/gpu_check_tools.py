"""Helpers of `scripts/gpu-check` that run outside its steps: the CLI argument check and the wheel download.

- `check_cli_args`: every `tangram` command of the plan parsed by the CLI's own click parser, nothing invoked,
  so a renamed or mistyped option fails on the CPU (in the dry run) instead of on a lent GPU.
- `fetch_wheels`: on a machine that reaches the package registry, download the wheels that a bare GPU image
  without network lacks (its image has torch, transformers, pytest and most of the rest; see
  docs/benchmarks.md, "GPU check"), pinned to the versions installed here, for CPython 3.12 on x86-64 Linux.
"""

from __future__ import annotations

import importlib
import logging
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tangram.bench.common import package_versions

log = logging.getLogger(__name__)

# What Tangram needs beyond a CUDA image that ships torch, transformers, safetensors, xxhash, typer, rich,
# httpx, prometheus-client, accelerate, pytest(-timeout) and hypothesis.
WHEEL_PACKAGES = ("pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions",
                  "fastapi", "starlette", "uvicorn", "gguf", "openai", "distro", "jiter", "sniffio")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")


def _typer_click() -> Any:
    """The click that typer builds on: the `click` package, or the copy newer typer versions ship inside."""
    import typer

    base = next(c for c in typer.Context.__mro__[1:] if c.__name__ == "Context")
    return importlib.import_module(base.__module__.rsplit(".", 1)[0])


def check_cli_args(commands: Sequence[Sequence[str]]) -> dict[str, str | None]:
    """Parse each `tangram` argument list with the CLI's own click parser (nothing invoked): command -> error."""
    import typer

    from tangram.cli import app

    click = _typer_click()
    root = typer.main.get_command(app)
    errors: dict[str, str | None] = {}
    for args in commands:
        key = shlex.join(args)
        try:
            cmd, ctx, rest = root, click.Context(root, info_name="tangram"), list(args)
            while hasattr(cmd, "get_command"):  # a group (newer typer ships no click.Group class)
                sub = cmd.get_command(ctx, rest[0]) if rest else None
                if sub is None:
                    raise click.ClickException(f"no such command: {rest[0] if rest else '(none)'}")
                ctx, cmd, rest = click.Context(sub, info_name=rest[0], parent=ctx), sub, rest[1:]
            cmd.make_context(ctx.info_name, rest, parent=ctx.parent)
            errors[key] = None
        except click.ClickException as exc:
            errors[key] = exc.format_message()
    return errors


def wheel_command(dest: Path, versions: Mapping[str, str | None], python: str = "3.12") -> list[str]:
    """The `pip download` of binary wheels only, without dependencies, for CPython `python` on x86-64 Linux."""
    specs = [f"{n}=={v}" if v else n for n, v in versions.items()]
    plat = [a for p in PLATFORMS for a in ("--platform", p)]
    return [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
            python, "--implementation", "cp", *plat, "-d", str(dest), *specs]


def fetch_wheels(dest: Path) -> int:
    """Download WHEEL_PACKAGES (at the versions installed here) into `dest`; pip's exit status."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = wheel_command(dest, package_versions(WHEEL_PACKAGES))
    log.info("%s", shlex.join(cmd))
    rc = subprocess.run(cmd).returncode
    if rc == 0:
        size = sum(p.stat().st_size for p in dest.glob("*.whl"))
        sys.stdout.write(f"{len(list(dest.glob('*.whl')))} wheels, {size / 2**20:.1f} MiB in {dest}\n")
    return rc
