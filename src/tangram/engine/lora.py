"""LoRA adapters of one instance: bound from the device pool, applied by hooks on the base's target modules.

Each target module of the base is *wrapped*, whatever `nn.Module` it is (a
plain, packed or fused linear): a forward hook (`lora_update.hook`) adds each
token's adapter update to the module's output inside the one forward of a
step. A module that no adapter this instance served targets has no hook at
all, so a step without adapters computes exactly what it computed before.

Adapters are bound from the device pool (`AdapterSet`): the first request for
one acquires its tensors through the pool (content hash, loader, DRAM tier);
the binding is released when its last request ends and the tensors stay
retained, so the next use is a re-bind (a pool hit). The hooks stay until the
instance closes.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from pathlib import Path

import torch

from tangram.engine.lora_update import Adapter, LoraPair, hook
from tangram.pool import DevicePool
from tangram.store import Checkpoint
from tangram.store.adapter import AdapterError, AdapterInfo, check_adapter

log = logging.getLogger(__name__)


class _Wrapped:
    """The hooks on one model's modules, counted by the adapter sets (instances) that hold each (instances
    sharing a skeleton share its hooks). Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._hooks: dict[tuple[int, str], tuple[torch.utils.hooks.RemovableHandle, int]] = {}

    def hold(self, model: torch.nn.Module, names: Iterable[str]) -> None:
        """Wrap the named modules of `model` (once per module, counted)."""
        with self._lock:
            for name in names:
                key = (id(model), name)
                handle, users = self._hooks.get(key, (None, 0))
                if handle is None:
                    handle = model.get_submodule(name).register_forward_hook(hook(name))
                self._hooks[key] = (handle, users + 1)

    def drop(self, model: torch.nn.Module, names: Iterable[str]) -> None:
        """Undo one `hold`; a module no adapter set holds any more loses its hook."""
        with self._lock:
            for name in names:
                key = (id(model), name)
                handle, users = self._hooks[key]
                if users <= 1:
                    handle.remove()
                    del self._hooks[key]
                else:
                    self._hooks[key] = (handle, users - 1)

    def wrapped(self, model: torch.nn.Module) -> list[str]:
        """Names of the modules of `model` that carry a hook."""
        with self._lock:
            return sorted(name for mid, name in self._hooks if mid == id(model))


WRAPPED = _Wrapped()


class AdapterSet:
    """The adapters one instance serves, bound from its pool on first use and released when unused."""

    def __init__(self, pool: DevicePool, model: torch.nn.Module, base: Checkpoint, *, owner: str) -> None:
        self.pool, self.model, self.base, self.owner = pool, model, base, owner
        self._lock = threading.Lock()
        self._bound: dict[str, Adapter] = {}
        self._checked: dict[str, tuple[Checkpoint, AdapterInfo]] = {}
        self._wrapped: set[str] = set()  # modules this set holds a hook on (until it closes)
        self._device = next(model.parameters()).device

    def acquire(self, path: str | Path, name: str | None = None) -> Adapter:
        """The adapter at `path` bound for one more request (acquired from the pool unless bound already).
        A load runs outside the set's lock: the engine thread releasing other adapters never waits for it."""
        key = str(path)
        with self._lock:
            adapter = self._bound.get(key)
            if adapter is not None:
                adapter.users += 1
                return adapter
            checked = self._checked.get(key)
        ckpt, info = checked or self._check(key)
        binding = self.pool.acquire(ckpt, model=name or key)
        try:
            modules = {}
            for module in info.modules:
                a, b = (binding.tensors[n] for n in AdapterInfo.tensor_names(module))
                if a.device != self._device:
                    raise AdapterError(ckpt.path, f"adapter tensors are on {a.device}, the model on {self._device}")
                modules[module] = LoraPair(a, b)
            with self._lock:
                other = self._bound.get(key)  # bound by a concurrent request meanwhile: use that binding
                if other is not None:
                    other.users += 1
                else:
                    new = modules.keys() - self._wrapped  # hooks stay until close: a re-bind registers none
                    WRAPPED.hold(self.model, new)
                    self._wrapped |= new
                    adapter = Adapter(key, name or Path(key).name, info.scaling, modules, binding, users=1)
                    self._bound[key] = adapter
        except BaseException:
            self.pool.release(binding)
            raise
        if other is not None:
            self.pool.release(binding)
            return other
        log.debug("bound adapter %s on %s (%d B loaded, %d B reused)", adapter.name, self.owner,
                  binding.bytes_loaded, binding.bytes_reused)
        return adapter

    def _check(self, key: str) -> tuple[Checkpoint, AdapterInfo]:
        ckpt = Checkpoint(key)
        info = check_adapter(ckpt.index, self.base.index, ckpt.path)
        with self._lock:
            self._checked[key] = (ckpt, info)
        return ckpt, info

    def release(self, adapter: Adapter) -> None:
        """One request of `adapter` ended; the last one unbinds it (its tensors stay retained in the pool)."""
        with self._lock:
            adapter.users -= 1
            if adapter.users > 0 or self._bound.get(adapter.key) is not adapter:
                return
            del self._bound[adapter.key]
        self._unbind(adapter)

    def _unbind(self, adapter: Adapter) -> None:
        self.pool.release(adapter.binding)

    def bound(self) -> list[str]:
        """Names of the adapters bound now."""
        with self._lock:
            return sorted(a.name for a in self._bound.values())

    def close(self) -> None:
        """Unbind every adapter and unwrap the modules (the instance stops)."""
        with self._lock:
            adapters, self._bound = list(self._bound.values()), {}
            wrapped, self._wrapped = self._wrapped, set()
        for adapter in adapters:
            self._unbind(adapter)
        WRAPPED.drop(self.model, wrapped)
