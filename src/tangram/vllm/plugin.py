"""vLLM's plugin entry point (`vllm.general_plugins` -> `tangram`): registers the `tangram` model loader in every
vLLM process that loads plugins (its engine core and worker processes too)."""

from __future__ import annotations

LOAD_FORMAT = "tangram"
_registered = False


def register() -> None:
    """Register `TangramModelLoader` under `load_format="tangram"` (once per process)."""
    global _registered
    if _registered:
        return
    from vllm.model_executor.model_loader import register_model_loader

    from tangram.vllm.loader import TangramModelLoader

    register_model_loader(LOAD_FORMAT)(TangramModelLoader)
    _registered = True
