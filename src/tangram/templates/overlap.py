"""Execute-while-load: each module of the first forward waits only for its own weights."""

from __future__ import annotations

import threading

import torch

from tangram.pool.loading import LoadFailed, LoadHandle


class WaitForWeights:
    """Forward pre-hooks that block a module until its parameters' bytes have landed.

    The bytes may come from this start's load or from another start's load of
    tensors both models share (`loading.failed()` tells whether one failed).
    Remove the hooks (`remove()`, on the thread that runs the forwards) once
    everything has landed; from then on each hook returns at once.
    """

    def __init__(self, model: torch.nn.Module, loading: LoadHandle) -> None:
        self.loading = loading
        ready = loading.landed
        self._pending = [e for e in {id(e): e for e in ready.values()}.values() if not e.is_set()]
        # failures of another start's load only matter when it still loads tensors bound here
        foreign = any(not e.is_set() and not loading.own(e) for e in ready.values())
        self._failed = loading.failed if foreign else lambda: False
        self._landed = False
        names = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            names.setdefault(id(p), []).append(name)
        self._handles = []
        for module in model.modules():
            events = [ready[n] for p in module.parameters(recurse=False) for n in names.get(id(p), []) if n in ready]
            if events:
                self._handles.append(module.register_forward_pre_hook(self._hook(events)))
        self.waits = 0

    def _hook(self, events: list[threading.Event]):
        def pre(_module, _args) -> None:
            if self.finished:
                return
            if not all(e.is_set() for e in events):
                self.waits += 1
            self.loading.check(events)  # raises LoadFailed if this start's load failed
            if self._failed():
                raise LoadFailed("loading the model's weights failed: a concurrent load of a tensor it shares "
                                 "with another model failed")
        return pre

    @property
    def finished(self) -> bool:
        """Whether every weight has landed, whole (this start's load and any it shares)."""
        if not self._landed and self.loading.done() and self.loading.error is None:
            self._pending = [e for e in self._pending if not e.is_set()]
            self._landed = not self._pending and not self._failed()
        return self._landed

    def remove(self) -> None:
        """Take the hooks off the model."""
        for h in self._handles:
            h.remove()
        self._handles = []
