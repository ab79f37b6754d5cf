"""Continuous-batching generation for one model instance: `step()` is schedule, run, postprocess.

The scheduler (`step_scheduler.py`) plans each step: every running sequence's
next token plus prompt chunks within a per-step token budget (chunked
prefill), its KV blocks grown or other sequences preempted; the model runner
(`runner.py`) runs the step's tokens in one forward; the output processor
(`output.py`) samples, detokenizes, applies stops and emits to each
request's sink. Requests join between steps; when nothing can be admitted
for lack of KV blocks the requests wait (back-pressure).

A step whose forward raises fails exactly the requests it worked on (finish
reason "error", KV freed); what no request can be blamed for fails all
queued ones (`step_or_fail`): a failing step is never retried on the same
requests.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable

from tangram.engine.batch import StepPlan
from tangram.engine.block_manager import BlockManager
from tangram.engine.constrain import GrammarCompiler, GrammarState
from tangram.engine.detok import TextStream
from tangram.engine.errors import RequestError
from tangram.engine.lora import AdapterSet
from tangram.engine.output import OutputProcessor
from tangram.engine.prompt import Prompt, check_prompt, encode_prompt
from tangram.engine.request import OutputQueue, Request, RequestOutput, Status, fork_sequences
from tangram.engine.runner import ModelRunner
from tangram.engine.sampling import SamplingParams, make_generator
from tangram.engine.stages import Totals
from tangram.engine.step_scheduler import StepScheduler
from tangram.pool.loading import LoadFailed
from tangram.store.errors import CheckpointError

log = logging.getLogger(__name__)
_ids = itertools.count()


class Engine:
    """Generation engine of one instance. `add_request`/`abort` are thread-safe; `step` runs on one thread."""

    def __init__(self, runner: ModelRunner, tokenizer, *, max_model_len: int, eos_token_ids: Iterable[int] = (),
                 max_batch: int = 16, max_step_tokens: int = 2048, max_kv_blocks: int | None = None,
                 ready_at: float | None = None, on_first_token: Callable[[Request], None] | None = None,
                 clock: Callable[[], float] = time.perf_counter, adapters: AdapterSet | None = None) -> None:
        self.runner, self.kv, self.tokenizer = runner, runner.kv, tokenizer
        self.adapters = adapters  # the LoRA adapters requests may name (None: none)
        self.max_model_len, self.max_kv_blocks = max_model_len, max_kv_blocks
        self.clock = clock
        self.ready_at = clock() if ready_at is None else ready_at
        self.totals = Totals()
        self.scheduler = StepScheduler(BlockManager(self.kv), max_batch=max_batch, max_step_tokens=max_step_tokens,
                                       totals=self.totals)
        self.output = OutputProcessor(eos_token_ids=eos_token_ids, max_model_len=max_model_len, emit=self._emit,
                                      finish=self.finish, on_first_token=on_first_token)
        self.vocab = runner.model.config.get_text_config().vocab_size
        self.grammars = GrammarCompiler(tokenizer, vocab=self.vocab, eos_token_ids=eos_token_ids)  # compiles lazily
        self.work = threading.Condition()  # notified on new requests and aborts
        self._incoming: deque[Request] = deque()
        self._aborts: set[str] = set()
        self._live: set[str] = set()
        self._commands: list[Callable[[], bool]] = []  # run between steps until each returns True (migration)
        self.stalled = False  # the last step could not admit or grow for lack of KV blocks
        self.failed: str | None = None  # why the instance can serve nothing more (its weights failed to load)

    @property
    def max_batch(self) -> int:
        """Sequences one step runs at most."""
        return self.scheduler.max_batch

    @property
    def running(self) -> list[Request]:
        """Requests holding KV, in admission order."""
        return self.scheduler.running

    @property
    def waiting(self) -> deque[Request]:
        """Requests waiting for admission, FIFO."""
        return self.scheduler.waiting

    # ------------------------------------------------------------------ requests in

    def encode(self, prompt: Prompt, chat: bool = False) -> list[int]:
        """Prompt ids from text (chat: through the checkpoint's chat template), messages (with tools), or ids."""
        return encode_prompt(self.tokenizer, prompt, chat)

    def add_request(self, prompt: Prompt, params: SamplingParams | None = None, *,
                    request_id: str | None = None, sink: Callable[[RequestOutput], None] | None = None,
                    arrival: float | None = None, chat: bool = False, adapter: str | None = None) -> Request:
        """Queue a request; outputs go to `sink` (default: an OutputQueue at `request.sink`). `adapter`: the path
        of a converted LoRA adapter of this model its tokens run with (bound from the pool now). Raises
        RequestError."""
        params = params or SamplingParams()
        ids = self.encode(prompt, chat)
        self.validate(ids, params)
        rid = request_id or f"req-{next(_ids)}"
        req = Request(rid, ids, params, self.clock() if arrival is None else arrival, sink or OutputQueue(),
                      TextStream(self.tokenizer, list(params.stop)), make_generator(params, self.kv.device()),
                      grammar=self._grammar(params))
        if params.n > 1:
            fork_sequences(req, self.kv.device(), grammar=self._grammar)
        if adapter is not None:
            self._bind([req, *req.forks], adapter)
        with self.work:
            if rid in self._live:
                for seq in [req, *req.forks]:
                    self._unbind(seq)
                raise RequestError(f"request id {rid!r} is already in use")
            self._live.add(rid)
            self._incoming.append(req)
            self.work.notify_all()
        return req

    def _grammar(self, params: SamplingParams) -> GrammarState | None:
        """A fresh structured-output matcher for a request (one per sequence of an n > 1 request), or None."""
        return self.grammars.compile(params.structured) if params.structured else None

    def validate(self, ids: list[int], params: SamplingParams) -> None:
        """RequestError when this instance cannot serve a prompt of `ids` with `params`."""
        check_prompt(ids, params, vocab=self.vocab, max_model_len=self.max_model_len)
        if self.max_kv_blocks is not None:
            need = self.kv.spec.blocks_for(min(len(ids) + params.max_tokens, self.max_model_len))
            if need > self.max_kv_blocks:
                raise RequestError(f"prompt and max_tokens need {need} KV blocks; this instance can hold "
                                   f"at most {self.max_kv_blocks} ({self.max_kv_blocks * self.kv.spec.block_tokens} "
                                   "tokens): lower max_tokens or shorten the prompt")

    def abort(self, request_id: str) -> None:
        """Stop a request (e.g. its client went away); its KV blocks are freed at the next step."""
        with self.work:
            if request_id in self._live:
                self._aborts.add(request_id)
                self.work.notify_all()

    def has_work(self) -> bool:
        """Whether any request is queued or running."""
        return bool(self._incoming or self._aborts or self._commands or self.scheduler.has_work())

    # ------------------------------------------------------------------ step

    def step(self) -> bool:
        """One engine iteration; False when nothing could progress (idle, or waiting for KV blocks)."""
        self._drain()
        if self.failed is not None:
            for req in self.scheduler.requests():
                self.finish(req, "error", error=self.failed, instance_failed=True)
            return False
        t0 = self.clock()
        plan = self.scheduler.schedule()
        self.stalled = plan.stalled
        if not plan.work:
            return False
        t1 = self.clock()
        for w in plan.work:
            req = w.request
            if req.prefill_began is None:
                req.prefill_began = t1
                req.stages.queue_s = max(0.0, t0 - max(req.arrival, self.ready_at))
                req.stages.kv_s = t1 - t0
        try:
            logits = self.runner.run(plan)
        except Exception as exc:  # noqa: BLE001 - a bad batch must not stop the engine
            self._fail_step(plan, exc)
            return True
        for w in plan.work:
            self.scheduler.advance(w)
        seconds = self.clock() - t1
        self.totals.decode_steps += 1
        self.totals.decode_s += seconds
        if plan.num_tokens > len(plan.work):  # some sequence ran more than one token: a prefill step
            self.totals.prefill_step_tokens += plan.num_tokens
            self.totals.prefill_step_s += seconds
        self.output.process(plan.work, logits, self.clock())
        return True

    def _fail_step(self, plan: StepPlan, exc: Exception) -> None:
        """Fail the requests of a step whose forward raised (when the weights failed to load, every request)."""
        batch = [w.request for w in plan.work if w.request.status is not Status.FINISHED]
        log.exception("step of %s failed", [r.id for r in batch], exc_info=exc)
        if isinstance(exc, LoadFailed):
            self.failed = str(exc)
            batch += [r for r in self.scheduler.requests() if r not in batch]
        for req in batch:
            if req.status is not Status.FINISHED:
                self.finish(req, "error", error=f"step failed: {type(exc).__name__}: {exc}",
                            instance_failed=self.failed is not None)

    def step_or_fail(self) -> bool:
        """`step`, but an exception escaping it fails every queued and running request instead of leaving
        them to be retried by the next step (a loop around this never spins on one bad batch)."""
        try:
            return self.step()
        except Exception as exc:  # noqa: BLE001 - the engine must go on serving later requests
            log.exception("engine step failed; failing the requests it could not attribute the failure to")
            self.fail_all(f"engine step failed: {type(exc).__name__}: {exc}")
            return True

    def fail_all(self, error: str) -> None:
        """Fail every queued and running request with `error` (their KV freed). Never raises."""
        with self.work:  # those not drained yet too: the step may have failed before draining them
            for req in self._incoming:
                self.scheduler.add(req)
            self._incoming.clear()
            self._aborts.clear()  # every live request is failed now
        for req in self.scheduler.requests():
            try:
                self.finish(req, "error", error=error)
            except Exception:  # noqa: BLE001 - drop it by force: it must not stay to be stepped again
                log.exception("could not finish %s cleanly; dropping it", req.id)
                for queue in (self.scheduler.running, self.scheduler.waiting):
                    if req in queue:
                        queue.remove(req)
                req.status = Status.FINISHED
                self._unbind(req)
                with self.work:
                    self._live.discard(req.id)
                self._emit(req, RequestOutput(req.id, "", [], req.text.text, True, "error", error))

    def _drain(self) -> None:
        with self.work:
            for req in self._incoming:
                self.scheduler.add(req)
            self._incoming.clear()
            aborts, self._aborts = self._aborts, set()
            commands, self._commands = self._commands, []
        if aborts:
            for req in [r for r in self.scheduler.requests() if r.id in aborts]:
                self.finish(req, "abort")
        if commands:
            again = [c for c in commands if not c()]
            with self.work:
                self._commands[:0] = again

    # ------------------------------------------------------------------ between steps (live migration)

    def between_steps(self, command: Callable[[], bool]) -> None:
        """Run `command` on the engine thread before each next step until it returns True (it must not raise)."""
        with self.work:
            self._commands.append(command)
            self.work.notify_all()

    def find(self, request_id: str) -> Request | None:
        """The live first sequence of a request (engine thread only), or None once it ended."""
        return next((r for r in self.scheduler.requests() if r.id == request_id and r.index == 0), None)

    def detach(self, req: Request) -> None:
        """Drop a request without a final output (it moved to another instance): KV freed (engine thread only)."""
        self.scheduler.finish(req)
        self._unbind(req)
        with self.work:
            self._live.discard(req.id)

    def extend(self, req: Request, ids: list[int]) -> None:
        """Append generated ids a request got from elsewhere (a migration round), with KV blocks for them; without
        blocks to spare it is preempted, so readmission takes blocks for all its ids (engine thread only)."""
        req.output_ids += ids
        req.ids += ids
        if req.status is Status.RUNNING and not self.scheduler.blocks.grow(req, len(req.ids)):
            self.scheduler.preempt(req)

    def adopt(self, req: Request) -> None:
        """Queue a request built elsewhere (one migrating in) under its id (engine thread only)."""
        with self.work:
            if req.id in self._live:
                raise RequestError(f"request id {req.id!r} is already in use")
            self._live.add(req.id)
        self.scheduler.add(req)

    # ------------------------------------------------------------------ finishing

    def finish(self, req: Request, reason: str, *, delta: str = "", new: list[int] | None = None,
               error: str | None = None, instance_failed: bool = False) -> None:
        """End a request: free its KV, drop it from the queues, unbind its adapter, send its final output."""
        self.scheduler.finish(req)
        self._unbind(req)
        req.finish_reason = reason
        if req.group is None or req.group.leave():
            with self.work:
                self._live.discard(req.id)
        if req.first_token_at is not None:
            self.totals.add(req.stages, len(req.prompt_ids), len(req.output_ids))
        self._emit(req, RequestOutput(req.id, delta, new or [], req.text.text, True, reason, error,
                                      len(req.prompt_ids), len(req.output_ids), req.stages, list(req.output_ids),
                                      instance_failed, **req.take_extras()))
        forks, req.forks = req.forks, []  # sequences of n > 1 that never got the prompt's KV end with it
        for seq in forks:
            self.finish(seq, reason, error=error, instance_failed=instance_failed)

    def _bind(self, seqs: list[Request], adapter: str) -> None:
        """Bind LoRA `adapter` for each of a request's sequences (each holds it until it finishes)."""
        if self.adapters is None:
            raise RequestError("this instance serves no LoRA adapters")
        try:
            for seq in seqs:
                seq.adapter = self.adapters.acquire(adapter)
        except CheckpointError as exc:
            for seq in seqs:
                self._unbind(seq)
            raise RequestError(f"the LoRA adapter cannot be used: {exc}") from None

    def _unbind(self, req: Request) -> None:
        if req.adapter is not None and self.adapters is not None:
            adapter, req.adapter = req.adapter, None
            self.adapters.release(adapter)

    def _emit(self, req: Request, out: RequestOutput) -> None:
        try:
            req.sink(out)
        except Exception:  # noqa: BLE001 - a broken consumer aborts only its own request
            log.warning("output sink of %s failed; aborting it", req.id, exc_info=True)
            if not out.finished:
                self.abort(req.id)

    # ------------------------------------------------------------------ synchronous use

    def generate(self, prompts: list, params: SamplingParams | list[SamplingParams] | None = None, *,
                 chat: bool = False, stall_timeout_s: float = 60.0) -> list[RequestOutput]:
        """Run prompts to completion on the calling thread; final outputs (full text) in prompt order."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        sinks: list[list[RequestOutput]] = [[] for _ in prompts]
        for p, sp, outs in zip(prompts, plist, sinks):
            self.add_request(p, sp, sink=outs.append, chat=chat)
        self.run_until_idle(stall_timeout_s)
        return [outs[-1] for outs in sinks]

    def run_until_idle(self, stall_timeout_s: float = 60.0) -> None:
        """Step until no request is left; waits on the pool while stalled, raises after `stall_timeout_s`."""
        last = self.clock()
        while self.has_work():
            if self.step_or_fail():
                last = self.clock()
            elif self.clock() - last > stall_timeout_s:
                raise TimeoutError(f"no KV memory came back for {stall_timeout_s:.0f} s")
            else:
                self.kv.wait_for_space(0.05)

    def shutdown(self) -> None:
        """Abort everything and free its KV blocks."""
        self._drain()
        for req in self.scheduler.requests():
            self.finish(req, "abort")
