"""Token-based live migration of running requests between instances of one model (ServerlessLLM's third idea).

The destination never gets KV: it gets tokens and recomputes their KV. In
round 1 the source sends the prompt and the tokens generated so far; the
destination queues them as a *held* request (`Request.hold`: it prefills all
its ids but the last and samples nothing) while the source decodes on; each
next round sends only the tokens generated meanwhile. Once few enough are
left, the source detaches the request between two steps (no final output:
its client stream stays open) and hands over the final state: the last
tokens, the seeded generator's state and the detokenizer's state. The
destination releases the hold and continues the same stream to the client's
sink, so a seeded sampled stream is the one it would have been unmoved.

Every operation runs on the engine thread between steps (`Engine.between_steps`);
the functions here wait for it with a timeout and are called off any event
loop. A backend that cannot migrate simply does not implement
`MigratableBackend` (the worker then reports "cannot migrate").
"""

from __future__ import annotations

import logging
import pickle
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Protocol, TypeVar, runtime_checkable

import torch

from tangram.engine.detok import DetokState, TextStream
from tangram.engine.engine import Engine
from tangram.engine.errors import RequestError
from tangram.engine.request import Request, RequestOutput, Status
from tangram.engine.sampling import SamplingParams
from tangram.engine.stages import Stages

log = logging.getLogger(__name__)
Sink = Callable[[RequestOutput], None]
T = TypeVar("T")
DEFAULT_TIMEOUT_S = 30.0


class MigrationError(RuntimeError):
    """A migration step could not be done (the request cannot move, or the instance did not answer in time)."""


@dataclass
class MigrationState:
    """One round of a migrating request, as it travels (picklable: it crosses Ray actors).

    `output_ids` are the generated ids after the first `offset` (what the destination has already);
    round 1 (`offset` 0) carries the prompt; the final round carries the generator and detokenizer state.
    """

    request_id: str
    offset: int
    output_ids: list[int]
    prompt_ids: list[int] = field(default_factory=list)
    params: SamplingParams | None = None
    age_s: float = 0.0  # seconds since the request arrived (clocks do not cross processes)
    generator: bytes | None = None  # torch.Generator.get_state() of a seeded sampled request
    detok: DetokState | None = None
    stages: Stages | None = None  # where its time to first token went (at the source), reported at its end
    final: bool = False
    finished: bool = False  # the request ended at the source before this round: nothing to move

    @property
    def nbytes(self) -> int:
        """Bytes of this round pickled (what it costs to send)."""
        return len(pickle.dumps(self))


@runtime_checkable
class MigratableBackend(Protocol):
    """An engine backend whose running requests can move to another instance of its model (optional)."""

    def migratable(self) -> list[str]:
        """Ids of the running requests that can migrate now."""
        ...

    def snapshot(self, request_id: str, offset: int) -> MigrationState:
        """The request's tokens after `offset` generated ones (round 1: `offset` 0, with its prompt)."""
        ...

    def plant(self, state: MigrationState, timeout_s: float) -> str:
        """Queue round 1 as a held request and wait until it is prefilled; its id here."""
        ...

    def extend(self, request_id: str, state: MigrationState, timeout_s: float) -> None:
        """Add a round's tokens to a held request and wait until they are prefilled."""
        ...

    def handover(self, request_id: str, offset: int) -> tuple[MigrationState, Sink]:
        """Detach the request between steps (no final output) and return its final round and its sink."""
        ...

    def resume(self, request_id: str, state: MigrationState, sink: Sink) -> None:
        """Release a held request with its final round: it streams on to `sink`."""
        ...

    def drop(self, request_id: str) -> None:
        """Forget a held request (a migration abandoned); its KV is freed."""
        ...


def refusal(req: Request) -> str | None:
    """Why a request cannot migrate, or None."""
    if req.params.n > 1:
        return "n > 1 sequences"
    if req.grammar is not None:
        return "structured output (its matcher state does not travel)"
    if req.adapter is not None:
        return "a LoRA adapter"
    if req.params.prompt_logprobs is not None and not req.prompt_logprobs_sent:
        return "prompt logprobs not sent yet"
    if req.first_token_at is None or req.status is Status.FINISHED or req.hold:
        return "not decoding"
    return None


def _on_engine(engine: Engine, fn: Callable[[], T | None], timeout_s: float, what: str, *,
               repeat: bool = False) -> T:
    """Run `fn` on the engine thread before a step; its value. `repeat`: rerun before each step until it returns
    non-None (read-only checks only). A one-shot `fn` runs entirely or not at all: on timeout, one that has not
    started is cancelled (MigrationError), one that has is waited for (it changes state: its result counts)."""
    fut: Future = Future()

    def command() -> bool:
        if fut.done() or (not repeat and not fut.set_running_or_notify_cancel()):
            return True  # cancelled by a timed-out caller
        try:
            value = fn()
        except Exception as exc:  # noqa: BLE001 - handed to the waiting caller
            fut.set_exception(exc)
            return True
        if value is None:
            return False
        fut.set_result(value)
        return True

    engine.between_steps(command)
    try:
        return fut.result(timeout_s)
    except TimeoutError:
        if fut.cancel():
            raise MigrationError(f"{what}: no answer from the engine in {timeout_s:.1f} s") from None
        return fut.result()  # it had started: it ends within this step


def migratable(engine: Engine, timeout_s: float = DEFAULT_TIMEOUT_S) -> list[str]:
    """Ids of the engine's requests that can migrate now."""
    return _on_engine(engine, lambda: [r.id for r in engine.running if refusal(r) is None], timeout_s, "list")


def snapshot(engine: Engine, request_id: str, offset: int, timeout_s: float = DEFAULT_TIMEOUT_S) -> MigrationState:
    """A round of `request_id`: its generated ids after `offset` (with its prompt and parameters when 0)."""
    def read() -> MigrationState:
        req = engine.find(request_id)
        if req is None or req.status is Status.FINISHED:
            return MigrationState(request_id, offset, [], finished=True)
        if (why := refusal(req)) is not None:
            raise MigrationError(f"{request_id} cannot migrate: {why}")
        state = MigrationState(request_id, offset, list(req.output_ids[offset:]))
        if offset == 0:
            state.prompt_ids, state.params = list(req.prompt_ids), req.params
            state.age_s = engine.clock() - req.arrival
        return state

    return _on_engine(engine, read, timeout_s, "snapshot")


def _caught_up(engine: Engine, request_id: str) -> Callable[[], bool | None]:
    def check() -> bool | None:
        req = engine.find(request_id)
        if req is None:
            raise MigrationError(f"held request {request_id} is gone (preempted out or failed)")
        return True if req.todo() <= 0 else None
    return check


def plant(engine: Engine, state: MigrationState, timeout_s: float = DEFAULT_TIMEOUT_S) -> str:
    """Queue round 1 as a held request (its KV recomputed from the tokens); its id, once prefilled."""
    if state.params is None or not state.prompt_ids:
        raise MigrationError("round 1 carries the prompt and the parameters")
    engine.validate(state.prompt_ids, state.params)  # RequestError when this instance cannot hold it
    rid = state.request_id
    tok = engine.tokenizer

    def add() -> str:
        nonlocal rid
        now = engine.clock()
        req = Request(rid, list(state.prompt_ids), state.params, now - state.age_s, _discard,
                      TextStream(tok, list(state.params.stop)), None, output_ids=list(state.output_ids),
                      hold=True, first_token_at=now, prompt_logprobs_sent=True)
        try:
            engine.adopt(req)
        except RequestError:  # the id is taken here (ids are per process): a fresh one
            rid = req.id = f"{state.request_id}-m{time.monotonic_ns()}"
            engine.adopt(req)
        return rid

    rid = _on_engine(engine, add, timeout_s, "plant")
    try:
        _on_engine(engine, _caught_up(engine, rid), timeout_s, "prefill", repeat=True)
    except MigrationError:
        drop(engine, rid, timeout_s)  # the caller never learns its id: it must not stay held
        raise
    return rid


def _append_round(engine: Engine, request_id: str, state: MigrationState, what: str):
    """The held request with a round's ids appended (on the engine thread); MigrationError when it is gone or the
    round does not follow the ids it holds."""
    req = engine.find(request_id)
    if req is None:
        raise MigrationError(f"held request {request_id} is gone")
    if len(req.output_ids) != state.offset:
        raise MigrationError(f"{what} at {state.offset} does not follow the {len(req.output_ids)} ids held")
    engine.extend(req, state.output_ids)
    return req


def extend(engine: Engine, request_id: str, state: MigrationState, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Add a round's ids to a held request, then wait until they are prefilled."""
    def add() -> bool:
        _append_round(engine, request_id, state, "round")
        return True

    _on_engine(engine, add, timeout_s, "extend")
    _on_engine(engine, _caught_up(engine, request_id), timeout_s, "prefill", repeat=True)


def handover(engine: Engine, request_id: str, offset: int,
             timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[MigrationState, Sink | None]:
    """Detach the request between steps; its final round (ids after `offset`, generator and detokenizer state)
    and its sink. A request that ended meanwhile gives a `finished` round and no sink."""
    def take() -> tuple[MigrationState, Sink | None]:
        req = engine.find(request_id)
        if req is None or req.status is Status.FINISHED:
            return MigrationState(request_id, offset, [], final=True, finished=True), None
        gen = bytes(req.generator.get_state().numpy().tobytes()) if req.generator is not None else None
        state = MigrationState(request_id, offset, list(req.output_ids[offset:]), generator=gen,
                               detok=req.text.export(), stages=req.stages.model_copy(), final=True)
        engine.detach(req)
        return state, req.sink

    return _on_engine(engine, take, timeout_s, "handover")


def resume(engine: Engine, request_id: str, state: MigrationState, sink: Sink,
           timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Release a held request with the final round: the last ids, generator and detokenizer; it streams to `sink`."""
    def release() -> bool:
        req = _append_round(engine, request_id, state, "final round")
        if state.generator is not None:
            req.generator = torch.Generator(device=engine.kv.device())
            req.generator.set_state(torch.frombuffer(bytearray(state.generator), dtype=torch.uint8))
        if state.detok is not None:
            req.text = TextStream.resume(engine.tokenizer, list(req.params.stop), state.detok)
        if state.stages is not None:
            req.stages = state.stages
        req.sink, req.hold = sink, False
        return True

    _on_engine(engine, release, timeout_s, "resume")


def drop(engine: Engine, request_id: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Forget a held request (its KV freed); nothing is emitted."""
    def forget() -> bool:
        req = engine.find(request_id)
        if req is not None and req.hold:
            engine.detach(req)
        return True

    _on_engine(engine, forget, timeout_s, "drop")


def _discard(out: RequestOutput) -> None:
    """The sink of a held request: it emits only when ended before its release (aborted, its engine stopping or
    failing), and then nobody listens: its migration is abandoned."""
    log.debug("held request %s ended before its release (%s)", out.request_id, out.finish_reason)


__all__ = ["MigratableBackend", "MigrationError", "MigrationState", "drop", "extend", "handover", "migratable",
           "plant", "refusal", "resume", "snapshot"]
