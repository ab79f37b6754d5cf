"""Records of the device pool: its registry entries, what an acquire returns, and what an eviction did."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from tangram.pool.ledger import Holding, Placement
from tangram.pool.loading import LoadHandle
from tangram.store import LoadStats


class PoolFullError(RuntimeError):
    """The request cannot be met without touching active bytes (wait for a release, then retry)."""

    def __init__(self, device: str, need: int, available: int) -> None:
        self.need, self.available = need, available
        super().__init__(f"device pool on {device}: need {need} bytes, only {available} free or retained")


@dataclass(kw_only=True)
class Resident(Holding):
    """A tensor in the registry: its range of the arena, its use (`Holding`), whether its bytes have landed."""

    key: str
    block: Placement
    nbytes: int
    ready: threading.Event = field(default_factory=threading.Event)
    failed: bool = False
    views: dict[tuple, torch.Tensor] = field(default_factory=dict, repr=False)  # typed views by (dtype, shape)


@dataclass
class ModelStats:
    """A model's decayed start rate, as the retention gain needs it."""

    rate: float = 0.0  # decayed request rate (starts per second)
    last: float = 0.0


@dataclass
class Binding:
    """One acquired model: its tensors (views into the pool) and what the acquire cost."""

    model: str
    tensors: dict[str, torch.Tensor]
    keys: list[str]
    bytes_loaded: int
    bytes_reused: int
    seconds: float
    loading: LoadHandle
    released: bool = False
    residents: list = field(default_factory=list, repr=False)

    @property
    def load(self) -> LoadStats | None:
        """What loading the missing tensors did, once done (None before, for a pool hit, or for a failed load)."""
        return self.loading.stats

    def wait_loaded(self) -> LoadStats | None:
        """What loading the missing tensors did, once done (None for a pool hit or a failed load)."""
        return self.loading.wait()


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
