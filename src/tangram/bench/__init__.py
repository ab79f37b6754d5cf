"""Benchmarks (`tangram bench ...`): each one a library function the CLI wraps.

- `tangram.bench.load.run_load_bench`: checkpoint bytes into device memory.

Shared helpers live in `tangram.bench.common`, synthetic models in `tangram.bench.synthetic`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["run_load_bench"]


def __getattr__(name: str) -> Any:
    if name == "run_load_bench":  # imported lazily: it pulls in torch and the store
        from tangram.bench.load import run_load_bench

        return run_load_bench
    raise AttributeError(name)
