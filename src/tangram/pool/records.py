"""Records of the device pool: its registry entries, what an acquire returns, and what an eviction did."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from tangram.pool.arena import Block
from tangram.pool.loading import LoadJob
from tangram.store import LoadStats


class PoolFullError(RuntimeError):
    """The request cannot be met without touching active bytes (wait for a release, then retry)."""

    def __init__(self, device: str, need: int, available: int) -> None:
        self.need, self.available = need, available
        super().__init__(f"device pool on {device}: need {need} bytes, only {available} free or retained")


@dataclass
class Resident:
    """A tensor in the registry: its block, reference count, the models that use it, its use statistics."""

    key: str
    block: Block
    nbytes: int
    refs: int = 0
    models: set[str] = field(default_factory=set)
    last_used: float = 0.0
    uses: float = 0.0
    ready: threading.Event = field(default_factory=threading.Event)
    failed: bool = False


@dataclass
class ModelStats:
    """A model's decayed start rate, as the retention gain needs it."""

    rate: float = 0.0  # decayed request rate (starts per second)
    last: float = 0.0


@dataclass
class KVBlock:
    """A KV cache block carved from the pool: `data` is its flat uint8 view."""

    key: str
    data: torch.Tensor
    block: Block


@dataclass
class Binding:
    """One acquired model: its tensors (views into the pool) and what the acquire cost."""

    model: str
    tensors: dict[str, torch.Tensor]
    keys: list[str]
    bytes_loaded: int
    bytes_reused: int
    seconds: float
    load: LoadStats | None = None
    released: bool = False
    ready: dict[str, threading.Event] = field(default_factory=dict)  # per tensor name: its bytes have landed
    residents: list = field(default_factory=list, repr=False)
    job: LoadJob | None = None

    def shared_failed(self) -> bool:
        """Whether the load of a tensor this binding shares, by this acquire or another, has failed."""
        return any(r.failed for r in self.residents)

    def wait_loaded(self) -> LoadStats | None:
        """What loading the missing tensors did, once done (None for a pool hit or a failed load)."""
        if self.job is not None:
            self.job.done.wait()
        return self.load


@dataclass(frozen=True)
class Eviction:
    """Retained tensors one allocation evicted from a pool: for whom, how many bytes, and whose they were."""

    for_model: str | None  # the model whose acquire needed the room; None: a KV cache block
    tensors: int
    bytes: int
    victims: dict[str, int]  # model -> bytes of its tensors evicted (a shared tensor counts for each model)
    at: float = field(default_factory=time.time)  # wall clock, comparable across processes and nodes


def eviction(for_model: str | None, evicted: Iterable[Resident]) -> Eviction:
    """The record of evicting `evicted` (arena bytes per tensor) to make room for `for_model`."""
    victims: dict[str, int] = {}
    count = total = 0
    for r in evicted:
        count, total = count + 1, total + r.block.size
        for m in r.models:
            victims[m] = victims.get(m, 0) + r.block.size
    return Eviction(for_model, count, total, victims)
