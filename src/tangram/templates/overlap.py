"""Execute-while-load: each module of the first forward waits only for its own weights.

An embedding lookup waits for nothing: while its matrix has not landed, its
output is built from the rows its input needs, read from the checkpoint file
(the matrix loads last; a tied output head still waits for all of it).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection, Mapping

import torch

from tangram.pool.loading import LoadJob, wait_for
from tangram.templates.record import gathers

RowReader = Callable[[str, list[int]], torch.Tensor]  # (tensor name, rows) -> those rows, on the CPU


class WaitForWeights:
    """Forward hooks that block a module until its parameters' bytes have landed.

    With `read_rows`, an embedding whose weight is in `gathered` does not block:
    its output is replaced by a lookup in the rows read for its input. Remove
    the hooks (`remove()`, on the thread that runs the forwards) once the load
    is done; until then a finished load makes each hook a flag check.
    """

    def __init__(self, model: torch.nn.Module, ready: Mapping[str, threading.Event], job: LoadJob,
                 read_rows: RowReader | None = None, gathered: Collection[str] = ()) -> None:
        self.job = job
        self.read_rows = read_rows
        names = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            names.setdefault(id(p), []).append(name)
        self._handles = []
        self.waits = 0
        self.gathers = 0
        self._local = threading.local()
        for module in model.modules():
            own = [n for p in module.parameters(recurse=False) for n in names.get(id(p), []) if n in ready]
            if not own:
                continue
            events = [ready[n] for n in own]
            weight = next((n for n in own if n.endswith("weight") and n in gathered), None)
            if read_rows is not None and weight is not None and gathers(module):
                self._handles.append(module.register_forward_pre_hook(self._note(events)))
                self._handles.append(module.register_forward_hook(self._gather(weight, events)))
            else:
                self._handles.append(module.register_forward_pre_hook(self._hook(events)))

    def _failed(self) -> None:
        if self.job.error is not None:
            raise RuntimeError(f"loading the model's weights failed: {self.job.error}") from self.job.error

    def _hook(self, events: list[threading.Event]):
        def pre(_module, _args) -> None:
            if not self.job.done.is_set():
                if not all(e.is_set() for e in events):
                    self.waits += 1
                wait_for(events, self.job)
            else:
                self._failed()
        return pre

    def _note(self, events: list[threading.Event]):
        def pre(_module, _args) -> None:  # whether the lookup about to run reads landed bytes
            self._failed()
            self._local.landed = all(e.is_set() for e in events)
        return pre

    def _gather(self, name: str, events: list[threading.Event]):
        def post(module, args, output: torch.Tensor) -> torch.Tensor:
            if getattr(self._local, "landed", True):
                return output
            ids = args[0]
            rows, inverse = torch.unique(ids, return_inverse=True)
            table = self.read_rows(name, rows.tolist()).to(device=output.device, dtype=output.dtype)
            self.gathers += 1
            return table[inverse]  # what the lookup gives once the matrix has landed, bit for bit
        return post

    @property
    def finished(self) -> bool:
        """Whether every weight has landed."""
        return self.job.done.is_set()

    def remove(self) -> None:
        """Take the hooks off the model."""
        for h in self._handles:
            h.remove()
        self._handles = []
