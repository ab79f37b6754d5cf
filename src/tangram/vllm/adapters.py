"""LoRA adapters of one vLLM instance: bound from the device pool, served by vLLM's own LoRA support.

The first request naming an adapter acquires the converted adapter in the pool (content hash, Tangram's
loader, the DRAM tier; a retained adapter is a pool hit), checks it against the base as the built-in engine
does, and has the shell load it into vLLM from views of the pool's arena (`Shell.bind_lora`: vLLM never reads
the adapter's tensor files). When its last request ends the shell removes it from vLLM, and only once the shell
says it holds no view of those tensors is the binding released (they stay retained in the pool). Every binding
gets a new vLLM id, so a removal still under way never meets a later binding of the same adapter.
"""

from __future__ import annotations

import itertools
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from tangram.engine.errors import RequestError
from tangram.pool import DevicePool
from tangram.pool.records import Binding
from tangram.store import Checkpoint
from tangram.store.adapter import AdapterInfo, check_adapter
from tangram.store.errors import CheckpointError
from tangram.vllm.binding import bind_spec, unstage
from tangram.vllm.messages import LoraRef
from tangram.vllm.shell import Shell

log = logging.getLogger(__name__)
_ids = itertools.count(1)  # vLLM's lora_int_id, > 0 and never reused in this process


@dataclass
class _Bound:
    ref: LoraRef
    binding: Binding
    users: int


class VllmAdapters:
    """The adapters one vLLM instance serves (`max_loras` 0: LoRA is off in its engine). Thread-safe: requests
    bind on the submitting threads, and release on the shell's reader thread."""

    def __init__(self, pool: DevicePool, base: Checkpoint, shell: Shell, *, max_loras: int, max_rank: int) -> None:
        self.pool, self.base, self.shell = pool, base, shell
        self.max_loras, self.max_rank = max_loras, max_rank
        self._lock = threading.Lock()  # the maps below (held briefly: the reader thread takes it)
        self._binding = threading.Lock()  # one first-use bind at a time
        self._bound: dict[str, _Bound] = {}
        self._checked: dict[str, tuple[Checkpoint, AdapterInfo]] = {}
        self.last_bind: Binding | None = None  # the latest first-use binding (what it loaded, for tests and logs)
        self.last_shell_s = 0.0  # that bind's seconds in the shell (vLLM's side), for the bench and logs

    def acquire(self, path: str) -> LoraRef:
        """The adapter at `path`, bound for one more request. Raises RequestError for an adapter this instance
        cannot serve, ShellError when the engine process is gone."""
        key = str(path)
        if self.max_loras == 0:
            raise RequestError("this vllm deployment runs without LoRA: set its engine's max_loras to serve "
                               "adapters")
        ref = self._use(key)
        if ref is not None:
            return ref
        with self._binding:
            ref = self._use(key)  # bound by a concurrent request meanwhile
            if ref is not None:
                return ref
            ckpt, _ = self._check(key)
            binding = self.pool.acquire(ckpt, model=Path(key).name)
            try:
                lora_id = next(_ids)
                ref = LoraRef(lora_id, f"{Path(key).name}#{lora_id}", key)
                spec, staging = bind_spec(self.pool, binding, "")  # no identity: only weight binds use one
                try:
                    seconds = self.shell.bind_lora(ref, spec)
                finally:
                    unstage(staging)
            except ValueError as exc:  # vLLM refused it; the shell serves on
                self.pool.release(binding)
                raise RequestError(f"the LoRA adapter cannot be used: {exc}") from None
            except BaseException:
                self.pool.release(binding)
                raise
            with self._lock:
                self._bound[key] = _Bound(ref, binding, users=1)
            self.last_bind, self.last_shell_s = binding, seconds
        log.debug("bound adapter %s in vLLM (%d B loaded, %d B reused, %.3f s in the shell)", ref.name,
                  binding.bytes_loaded, binding.bytes_reused, seconds)
        return ref

    def _use(self, key: str) -> LoraRef | None:
        with self._lock:
            bound = self._bound.get(key)
            if bound is None:
                return None
            bound.users += 1
            return bound.ref

    def _check(self, key: str) -> tuple[Checkpoint, AdapterInfo]:
        with self._lock:
            checked = self._checked.get(key)
        if checked is None:
            try:
                ckpt = Checkpoint(key)
                info = check_adapter(ckpt.index, self.base.index, ckpt.path)
            except CheckpointError as exc:
                raise RequestError(f"the LoRA adapter cannot be used: {exc}") from None
            checked = (ckpt, info)
            with self._lock:
                self._checked[key] = checked
        if checked[1].r > self.max_rank:
            raise RequestError(f"the LoRA adapter's rank {checked[1].r} is above this vllm deployment's "
                               f"max_lora_rank {self.max_rank}")
        return checked

    def release(self, ref: LoraRef) -> None:
        """One request of `ref` ended; the last one removes it from vLLM, then releases its pool binding."""
        with self._lock:
            bound = self._bound.get(ref.path)
            if bound is None or bound.ref != ref:
                return
            bound.users -= 1
            if bound.users > 0:
                return
            del self._bound[ref.path]
        self.shell.drop_lora(ref.lora_id, lambda: self.pool.release(bound.binding))

    def bound(self) -> list[str]:
        """Paths of the adapters bound now."""
        with self._lock:
            return sorted(self._bound)

    def close(self) -> None:
        """Remove every adapter (the instance stops; its shell may be parked for another model)."""
        with self._lock:
            bound, self._bound = list(self._bound.values()), {}
        for b in bound:
            self.shell.drop_lora(b.ref.lora_id, lambda b=b: self.pool.release(b.binding))
