"""What every `tangram` command shares: the consoles and the one way an error is reported."""

from __future__ import annotations

from typing import NoReturn

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.text import Text

console = Console()
err = Console(stderr=True)


def auto_device(device: str) -> str:
    """The device a command runs on: "auto" is cuda when this torch sees a CUDA device, else cpu; any other value
    as given (torch validates it where it is used)."""
    if device != "auto":
        return device
    import torch  # not at import: `tangram --help` stays fast

    return "cuda" if torch.cuda.is_available() else "cpu"


def error_message(exc: BaseException | str) -> str:
    """The text of an error; a pydantic ValidationError as `field: message` lines instead of its long repr."""
    if isinstance(exc, ValidationError):
        lines = []
        for e in exc.errors():
            loc = ".".join(str(x) for x in e.get("loc", ()))
            lines.append(f"{loc}: {e.get('msg', 'invalid value')}" if loc else str(e.get("msg", "invalid value")))
        return "; ".join(lines) or str(exc)
    return str(exc)


def fail(exc: BaseException | str, code: int = 2) -> NoReturn:
    """Print `error: <message>` (styled, the message taken literally: no markup) to stderr and exit with `code`."""
    # A Text object is never parsed for markup, so brackets in paths or messages print as they are.
    err.print(Text.assemble(("error:", "bold red"), " ", error_message(exc)), soft_wrap=True, highlight=False)
    raise typer.Exit(code=code)
