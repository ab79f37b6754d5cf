"""Execute-while-load: each module of the first forward waits only for its own weights."""

from __future__ import annotations

import threading
from collections.abc import Mapping

import torch

from tangram.pool.loading import LoadJob, wait_for


class WaitForWeights:
    """Forward pre-hooks that block a module until its parameters' bytes have landed.

    Remove them (`remove()`, on the thread that runs the forwards) once the load
    is done; until then a finished load makes each hook a flag check.
    """

    def __init__(self, model: torch.nn.Module, ready: Mapping[str, threading.Event], job: LoadJob) -> None:
        self.job = job
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
            if not self.job.done.is_set():
                if not all(e.is_set() for e in events):
                    self.waits += 1
                wait_for(events, self.job)
            elif self.job.error is not None:
                raise RuntimeError(f"loading the model's weights failed: {self.job.error}")
        return pre

    @property
    def finished(self) -> bool:
        """Whether every weight has landed."""
        return self.job.done.is_set()

    def remove(self) -> None:
        """Take the hooks off the model."""
        for h in self._handles:
            h.remove()
        self._handles = []
