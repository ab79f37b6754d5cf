"""A model's weights in the pool's arena as named tensors, in the shell process (imports torch only: the shell's
interpreter has vLLM's dependencies, not Tangram's)."""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator

import torch

from tangram.vllm.messages import BindSpec


def arena_of(spec: BindSpec) -> torch.Tensor:
    """The arena a spec points into, mapped in this process (CPU) or opened from its IPC handle (CUDA)."""
    if spec.arena is not None:
        return spec.arena
    if spec.arena_path is None:
        raise ValueError("a bind spec names neither an arena file nor a CUDA arena")
    fd = os.open(spec.arena_path, os.O_RDWR)
    try:
        region = mmap.mmap(fd, spec.arena_bytes, flags=mmap.MAP_SHARED)
    finally:
        os.close(fd)  # the mapping keeps the memory
    return torch.frombuffer(region, dtype=torch.uint8)


def iter_weights(spec: BindSpec, arena: torch.Tensor | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, tensor) for every tensor of `spec`: views into the arena, no copy."""
    buf = arena_of(spec) if arena is None else arena
    for ref in spec.tensors:
        dtype = getattr(torch, ref.dtype)
        yield ref.name, buf[ref.offset : ref.offset + ref.nbytes].view(dtype).view(ref.shape)


def tied_groups(model: torch.nn.Module) -> list[tuple[torch.nn.Module, list[torch.nn.Module]]]:
    """Modules that share one `weight` parameter: the first one (it loads) and the others."""
    by_param: dict[int, list[torch.nn.Module]] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        w = dict(module.named_parameters(recurse=False)).get("weight")
        if isinstance(w, torch.nn.Parameter) and w.numel() > 0:
            group = by_param.setdefault(id(w), [])
            if all(m is not module for m in group):
                group.append(module)
    return [(g[0], g[1:]) for g in by_param.values() if len(g) > 1]
