"""oneDNN-packed Linear weights for the CPU: the matmuls of a step read weights in oneDNN's blocked layout.

PyTorch's plain `linear` on a CPU hands oneDNN a weight in the checkpoint's
row-major layout, which it re-lays out on every call; packing each weight once
(`torch.ops.mkldnn._reorder_linear_weight`) removes that from every step.
Measured on the 2-core VM (SmolLM2-135M, one forward): bf16 1 / 16 / 32 rows
32 / 28-36 / 36 ms plain against 12 / 18-20 / 25 ms packed; fp32 16 / 32 rows
64 / 80 ms against 27 / 35 ms.

The packed copies are host memory outside the device pool (oneDNN owns them:
they have no storage a pool arena could hold). The pool keeps the plain
tensors, shared by content, which is what a start binds; the packed copies
are cached process-wide by tensor identity (content hash, dtype, shape), so a
pool-hit restart of the same weights packs nothing, and the cache is bounded
(`TANGRAM_PACKED_BYTES`, default `DEFAULT_LIMIT`): entries no running
instance holds are evicted least recently used first. A module whose packed
weight was evicted runs the plain `linear` until it is packed again.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tangram.engine.fuse import FusedPart, FusedProjection, groups

log = logging.getLogger(__name__)
DEFAULT_LIMIT = 4 << 30  # bytes of packed weights kept when no instance holds them


def available(device: torch.device | str) -> bool:
    """Whether this PyTorch can pack Linear weights for `device` (CPUs with oneDNN)."""
    return (torch.device(device).type == "cpu" and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


@functools.cache
def packable() -> tuple[torch.dtype, ...]:
    """The weight dtypes oneDNN packs on this CPU: float32, and bfloat16 where oneDNN's bf16 path runs
    (AVX512-BF16/AMX, or AVX512BW+VL+DQ; an AVX2-only CPU refuses to pack a bf16 weight, so its bf16
    linears stay plain)."""
    bf16 = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return (torch.float32, torch.bfloat16) if bf16 is not None and bf16() else (torch.float32,)


class PackedCache:
    """Packed weights by tensor identity; held ones are never evicted. Thread-safe."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit = limit_bytes
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, tuple[torch.Tensor, int]] = OrderedDict()
        self._holds: dict[str, int] = {}
        self.bytes = 0

    def acquire(self, ident: str, weight: torch.Tensor | Callable[[], torch.Tensor], hint: int) -> None:
        """Hold the packed copy of `weight` (packing it unless cached; a callable builds it only then)."""
        with self._lock:
            if ident in self._entries:
                self._entries.move_to_end(ident)
                self._holds[ident] = self._holds.get(ident, 0) + 1
                return
        if callable(weight):
            weight = weight()
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), hint)  # outside the lock: it copies
        size = weight.numel() * weight.element_size()
        with self._lock:
            if ident not in self._entries:
                self._entries[ident] = (packed, size)
                self.bytes += size
            self._holds[ident] = self._holds.get(ident, 0) + 1
            self._trim()

    def release(self, idents: Iterable[str]) -> None:
        """Drop holds taken by `acquire`; unheld entries stay cached until the limit evicts them."""
        with self._lock:
            for ident in idents:
                left = self._holds.get(ident, 0) - 1
                if left > 0:
                    self._holds[ident] = left
                else:
                    self._holds.pop(ident, None)
            self._trim()

    def get(self, ident: str) -> torch.Tensor | None:
        """The packed copy, or None when it is not cached."""
        entry = self._entries.get(ident)
        return None if entry is None else entry[0]

    def _trim(self) -> None:
        for ident in [k for k in self._entries if k not in self._holds]:
            if self.bytes <= self.limit:
                break
            _, size = self._entries.pop(ident)
            self.bytes -= size


PACKED = PackedCache(int(os.environ.get("TANGRAM_PACKED_BYTES", DEFAULT_LIMIT)))


class PackedLinear:
    """The forward of one `nn.Linear` through its packed weight (the plain one when that is not cached)."""

    def __init__(self, module: torch.nn.Linear, ident: str, cache: PackedCache) -> None:
        self.module, self.ident, self.cache = module, ident, cache

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        packed = self.cache.get(self.ident)
        m = self.module
        if packed is None or x.dtype != m.weight.dtype:
            return F.linear(x, m.weight, m.bias)
        return torch.ops.mkldnn._linear_pointwise(x, packed, m.bias, "none", [], "")


@dataclass
class _Routes:
    """How one model's linears were routed: for the tensors `identities` names (every bound tensor, by
    `data_ptr`), the cache identities held, each with what builds its weight again (read from the module
    when called: a re-bound skeleton has new parameter objects over the same bytes)."""

    identities: dict[int, str]
    hint: int
    fuse: bool
    cache: PackedCache
    held: list[tuple[str, Callable[[], torch.Tensor]]]


_ROUTED: weakref.WeakKeyDictionary[torch.nn.Module, _Routes] = weakref.WeakKeyDictionary()
_ROUTED_LOCK = threading.Lock()


def prepack(model: torch.nn.Module, identities: Mapping[int, str], *, hint: int,
            cache: PackedCache = PACKED, fuse: bool = True) -> list[str]:
    """Route every CPU `nn.Linear` of `model` whose weight has an identity (by `data_ptr`) through a packed
    copy: sibling projections (`fuse.py`) through one packed concatenation, when `fuse`; returns the
    identities held (give them to `cache.release` when the instance stops). A kept skeleton routed before
    for the same tensors (a pool-hit restart) keeps its routing: only the holds are taken again."""
    with _ROUTED_LOCK:
        routes = _ROUTED.get(model)
    if routes is not None and (routes.identities, routes.hint, routes.fuse, routes.cache) == (
            identities, hint, fuse, cache):
        for ident, weight in routes.held:
            cache.acquire(ident, weight, hint)
        return [ident for ident, _ in routes.held]
    unpack(model)
    held: list[tuple[str, Callable[[], torch.Tensor]]] = []
    for group in groups(model, identities, packable()) if fuse else []:
        cache.acquire(group.ident, group.weight, hint)
        held.append((group.ident, group.weight))
        fused = FusedProjection(group, cache, group.bias())
        for i, member in enumerate(group.members):
            member.forward = fused.part(i)  # an instance attribute: nn.Module calls it
    for module in model.modules():
        if type(module) is not torch.nn.Linear or "forward" in module.__dict__:
            continue
        w = module.weight
        ident = identities.get(w.data_ptr()) if w.device.type == "cpu" and w.dtype in packable() else None
        if ident is None:
            continue
        cache.acquire(ident, w, hint)
        held.append((ident, functools.partial(_weight_of, module)))
        module.forward = PackedLinear(module, ident, cache)
    with _ROUTED_LOCK:
        _ROUTED[model] = _Routes(dict(identities), hint, fuse, cache, held)
    log.debug("packed %d linear weights (%d MiB cached)", len(held), cache.bytes >> 20)
    return [ident for ident, _ in held]


def _weight_of(module: torch.nn.Linear) -> torch.Tensor:
    return module.weight


def unpack(model: torch.nn.Module) -> None:
    """Route every `nn.Linear` of `model` back through the plain `linear` (a kept skeleton packed before)."""
    with _ROUTED_LOCK:
        _ROUTED.pop(model, None)
    for module in model.modules():
        if isinstance(module.__dict__.get("forward"), (PackedLinear, FusedPart)):
            del module.forward
