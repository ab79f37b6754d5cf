"""The engine-backend contract: what a worker needs from a running model instance, and how one starts.

A worker knows an instance only through `EngineBackend` (submit, abort,
outputs streamed to a sink, health, stop, start cost, freeable bytes, mean
prefill time) and starts one through the `BackendFactory` registered under a
deployment's `backend` name. The built-in engine (`tangram.engine.builtin`:
`Instance` + `EngineLoop`) and vLLM (`tangram.vllm.backend`: a vLLM engine
process bound to the pool's tensors) are registered as "builtin" and "vllm".
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

from tangram.engine.prompt import Prompt
from tangram.engine.request import RequestOutput
from tangram.engine.sampling import SamplingParams
from tangram.engine.stages import EngineRates, StartCost

if TYPE_CHECKING:
    from tangram.engine.instance import EngineConfig
    from tangram.pool import DevicePool
    from tangram.store import Checkpoint, LoadStats

BackendName = Literal["builtin", "vllm"]
Sink = Callable[[RequestOutput], None]


@runtime_checkable
class EngineBackend(Protocol):
    """A model instance running on one device pool, as its worker drives it. Thread-safe; outputs of a request
    reach its sink from the backend's own thread, in order, the last one with `finished` set."""

    @property
    def cost(self) -> StartCost:
        """What the start cost so far (a background load may still be running: see `final_cost`)."""
        ...

    def submit(self, prompt: Prompt, params: SamplingParams, sink: Sink, *, arrival: float,
               chat: bool = False, adapter: str | None = None) -> str:
        """Validate and queue a request (CPU work: tokenizing, compiling a structured-output grammar; call it off
        an event loop); its id. A `ChatPrompt` carries the tools its chat template renders. `adapter`: the path
        of a converted LoRA adapter of this model the request runs with.
        Raises `RequestError` for a prompt or parameters the instance cannot serve."""
        ...

    def abort(self, request_id: str) -> None:
        """Stop a request and free what it holds; its sink gets a last, finished output. Never blocks."""
        ...

    def health(self) -> str | None:
        """Why this instance can serve nothing more (its weights failed to load), or None while it can."""
        ...

    def final_cost(self) -> StartCost:
        """The start's cost once its load is over (blocks until a background load ends)."""
        ...

    def load_stats(self) -> LoadStats | None:
        """Where the start's bytes came from and how long they took (blocks until the load ends)."""
        ...

    def freeable_bytes(self) -> int:
        """Pool bytes that stopping this instance would give back (weights no other instance holds, KV reserve)."""
        ...

    def mean_prefill_s(self, prior: float) -> float:
        """Mean prefill seconds this instance measured (`prior` before its first request)."""
        ...

    def rates(self) -> EngineRates:
        """Its engine's step and prefill speed as measured so far (the live-migration estimate's inputs)."""
        ...

    def stop(self) -> None:
        """Abort what is left, free KV and release the weights to the pool (they stay retained). Blocking."""
        ...


class BackendFactory(Protocol):
    """Starts an instance of `checkpoint` on `pool` (blocking: load + init). `arrival`: when the request that
    caused the start arrived (`perf_counter`), so the start's stages are measured from it."""

    def __call__(self, checkpoint: Checkpoint, pool: DevicePool, config: EngineConfig, *, name: str,
                 arrival: float) -> EngineBackend:
        ...


def _builtin(checkpoint: Checkpoint, pool: DevicePool, config: EngineConfig, *, name: str,
             arrival: float) -> EngineBackend:
    from tangram.engine.builtin import BuiltinBackend  # the engine imports torch and transformers: on first use

    return BuiltinBackend(checkpoint, pool, config, name=name, arrival=arrival)


def _vllm(checkpoint: Checkpoint, pool: DevicePool, config: EngineConfig, *, name: str,
          arrival: float) -> EngineBackend:
    from tangram.vllm.backend import VllmBackend  # vLLM itself runs in the shell process, never here

    return VllmBackend(checkpoint, pool, config, name=name, arrival=arrival)


BACKENDS: dict[str, BackendFactory] = {"builtin": _builtin, "vllm": _vllm}


def prewarm_backend(backend: str, checkpoint: Path, pool: DevicePool, config: EngineConfig) -> float:
    """Keep warm what a start of `checkpoint` with `backend` can reuse (vllm: an engine shell of its shape, built on
    a thread); seconds spent in this call. The built-in engine warms through its templates (`Worker.warm`)."""
    if backend == "vllm":
        from tangram.vllm.backend import prewarm

        return prewarm(checkpoint, pool, config)
    return 0.0


def warm_engines(pool: DevicePool) -> int:
    """Engine processes a backend keeps warm for `pool` now (parked vLLM shells)."""
    from tangram.vllm.shells import shells_for  # no vLLM import: the parent's side of the shells only

    return shells_for(pool).parked()


def start_backend(backend: str, checkpoint: Checkpoint, pool: DevicePool, config: EngineConfig, *, name: str,
                  arrival: float) -> EngineBackend:
    """Start an instance with the backend registered as `backend` (ValueError for an unknown name)."""
    try:
        factory = BACKENDS[backend]
    except KeyError:
        raise ValueError(f"unknown engine backend {backend!r}: one of {', '.join(sorted(BACKENDS))}") from None
    return factory(checkpoint, pool, config, name=name, arrival=arrival)
