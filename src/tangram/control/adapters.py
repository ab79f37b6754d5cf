"""Adapter deployments: LoRA adapters served on the instances of a base deployment.

An adapter deployment names its adapter (a PEFT directory, converted once into
the data dir, or a converted adapter) and its base deployment; the adapter is
checked against the base's checkpoint at deploy (modules and shapes) and
refused with a clear error when it does not fit. A request naming the adapter
in `model` is routed to an instance of the base with the adapter's path; the
engine binds the adapter from the device pool for it. The base's instances
count adapter requests as their own, so a base stays while any of its
adapters has traffic; an adapter unused on an instance is unbound there (its
tensors stay retained in the pool: the next use is a pool hit).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from tangram.control.controller import Controller
from tangram.control.deployments import Deployment
from tangram.control.events import Activity
from tangram.engine import RequestOutput, SamplingParams
from tangram.resolve import converted_path
from tangram.store import Checkpoint
from tangram.store.adapter import AdapterInfo, check_adapter, convert_adapter, is_peft_adapter
from tangram.store.errors import CheckpointError, MissingFileError
from tangram.store.format import INDEX_FILE

log = logging.getLogger(__name__)


class AdapterDeployError(ValueError):
    """An adapter deployment that cannot be made; `param` names the field at fault."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class AdapterState:
    """What the controller keeps of one adapter deployment."""

    spec: Deployment
    path: Path  # the converted adapter checkpoint
    info: AdapterInfo
    bytes: int
    inflight: int = 0  # its requests now (on the base's instances)

    @property
    def base(self) -> str:
        """The base deployment's name."""
        assert self.spec.base is not None
        return self.spec.base


def resolve_adapter(source: str | Path, base: Path) -> tuple[Path, AdapterInfo, int]:
    """The converted adapter for `source` (a PEFT directory is converted once, into the data dir), checked
    against the base checkpoint `base`: (path, info, bytes). Blocking; raises CheckpointError subclasses."""
    path = Path(source)
    base_index = Checkpoint(base).index
    if (path / INDEX_FILE).is_file():
        resolved = path
    elif is_peft_adapter(path):
        resolved = converted_path(path)
        if not (resolved / INDEX_FILE).is_file():
            log.info("converting adapter %s to %s", path, resolved)
            convert_adapter(path, resolved, base_index, overwrite=True)
    elif not path.exists():
        raise MissingFileError(path, "no such adapter: give a PEFT adapter directory or a converted adapter")
    else:
        raise CheckpointError(path, "not a LoRA adapter (no adapter_config.json, no Tangram index)")
    index = Checkpoint(resolved).index
    return resolved, check_adapter(index, base_index, resolved), index.total_bytes


def engine_refusal(base: Deployment, info: AdapterInfo) -> str | None:
    """Why the instances of `base` cannot serve an adapter of `info`, or None. The built-in engine serves any
    adapter that fits the base's shapes; a vllm engine only with LoRA on and up to its `max_lora_rank`."""
    if base.backend != "vllm":
        return None
    if base.engine.max_loras == 0:
        return (f"base deployment {base.name!r} runs on vllm without LoRA: deploy it with engine.max_loras >= 1 "
                "(vLLM's max_loras)")
    if info.r > base.engine.max_lora_rank:
        return (f"the adapter's rank {info.r} is above base deployment {base.name!r}'s engine.max_lora_rank "
                f"{base.engine.max_lora_rank}")
    return None


class Adapters:
    """The adapter deployments of a controller, by name."""

    def __init__(self) -> None:
        self._states: dict[str, AdapterState] = {}

    async def deploy(self, spec: Deployment, bases: Mapping[str, tuple[Deployment, Path]], activity: Activity
                     ) -> AdapterState:
        """Convert (once) and check the adapter against its base off the event loop, then register it.
        `bases`: the base deployments and their checkpoints. AdapterDeployError for a name or base that does not
        fit."""
        if spec.adapter is None or spec.name in bases:
            kind = "an adapter" if spec.adapter is None else "a base model"
            raise AdapterDeployError(f"{spec.name!r} is already deployed as {kind}; remove it first", "name")
        if spec.base not in bases:
            raise AdapterDeployError(f"base deployment {spec.base!r} does not exist", "base")
        loop = asyncio.get_running_loop()
        base, base_path = bases[spec.base]
        path, info, size = await loop.run_in_executor(None, functools.partial(resolve_adapter, spec.adapter,
                                                                              base_path))
        refusal = engine_refusal(base, info)
        if refusal is not None:
            raise AdapterDeployError(refusal, "base")
        state = self._states[spec.name] = AdapterState(spec, path, info, size)
        activity.record("deploy", f"deployed adapter {spec.name} (rank {info.r}, {size / 1e6:.1f} MB) on "
                        f"{spec.base}", spec.name)
        return state

    def get(self, name: str) -> AdapterState | None:
        """The adapter deployment `name`, or None."""
        return self._states.get(name)

    def names(self) -> list[str]:
        """Adapter deployment names."""
        return sorted(self._states)

    def of_base(self, base: str) -> list[str]:
        """The adapters served on the base deployment `base`."""
        return sorted(n for n, s in self._states.items() if s.base == base)

    def remove(self, name: str) -> AdapterState:
        """Forget an adapter deployment (instances unbind it when its requests end)."""
        return self._states.pop(name)

    def describe(self, name: str, base: dict) -> dict:
        """An adapter deployment's settings, with its base's live state (`base`: the base's description)."""
        s = self._states[name]
        shared = {k: base[k] for k in ("instances", "starting", "queued", "last_error")}  # the base's instances
        return {**s.spec.model_dump(mode="json"), "resolved_checkpoint": str(s.path), "bytes": s.bytes,
                "parent": s.base, "rank": s.info.r, "scaling": s.info.scaling, "modules": len(s.info.modules),
                **shared, "inflight": s.inflight, "pool_bytes_needed": s.bytes,
                "starts": {"pool-hit": 0, "dram": 0, "cold": 0}, "bytes_loaded": 0, "bytes_reused": 0}


class LoraController(Controller):
    """The controller with adapter deployments (what `tangram serve` runs): an adapter names its base
    deployment, and its requests run on the base's instances with the adapter's path."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.adapters = Adapters()

    async def deploy(self, spec: Deployment) -> dict:
        """A base model as `Controller.deploy`; an adapter converted (once) and checked against its base."""
        if spec.adapter is None and self.adapters.get(spec.name) is None:
            return await super().deploy(spec)
        bases = {n: (self.spec(n), Path(self.describe(n)["resolved_checkpoint"])) for n in super().names()}
        await self.adapters.deploy(spec, bases, self.activity)
        return self.describe(spec.name)

    async def remove(self, name: str) -> None:
        """Forget an adapter (its base stays), or stop a base deployment and forget it with its adapters."""
        is_adapter = self.adapters.get(name) is not None
        for adapter in [name] if is_adapter else self.adapters.of_base(name):
            self.adapters.remove(adapter)
            self.activity.record("remove", f"removed adapter {adapter}", adapter)
        if not is_adapter:
            await super().remove(name)

    def names(self) -> list[str]:
        """Deployment names, adapters included."""
        return sorted([*super().names(), *self.adapters.names()])

    def describe(self, name: str) -> dict:
        """A deployment's settings and live state; an adapter's with its `parent` and its base's instances."""
        adapter = self.adapters.get(name)
        if adapter is None:
            return super().describe(name)
        return self.adapters.describe(name, super().describe(adapter.base))

    def generate(self, name: str, prompt, params: SamplingParams, *, chat: bool = False,
                 adapter: str | None = None) -> AsyncIterator[RequestOutput]:
        """`Controller.generate`; a request naming an adapter runs on an instance of its base."""
        state = self.adapters.get(name)
        if state is None:
            return super().generate(name, prompt, params, chat=chat, adapter=adapter)
        return self._adapter_stream(state, prompt, params, chat)

    async def _adapter_stream(self, state: AdapterState, prompt, params: SamplingParams, chat: bool
                              ) -> AsyncIterator[RequestOutput]:
        state.inflight += 1
        try:  # closed with the caller's stream, so a client that goes away still aborts the request
            async with contextlib.aclosing(super().generate(state.base, prompt, params, chat=chat,
                                                            adapter=str(state.path))) as outs:
                async for out in outs:
                    yield out
        finally:
            state.inflight -= 1
