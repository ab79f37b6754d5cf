"""Continuous-batching generation for one model instance: `step()` is schedule, run, postprocess.

Each step admits waiting requests (FIFO) whose KV blocks the allocator can
give, prefills them together in one forward (prompts left-padded to the
longest), then runs one batched decode step over every running sequence;
new requests join between decode steps. When a running sequence needs a
block and none is left, the most recently admitted one is preempted
(its blocks freed, recomputed later); when nothing can be admitted the
requests wait (back-pressure). Outputs are pushed to each request's sink.

A step that raises fails exactly the requests it worked on (finish_reason
"error", KV freed); what no request can be blamed for fails all queued ones
(`step_or_fail`): a failing step is never retried on the same requests.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable

from tangram.engine import scheduler
from tangram.engine.detok import TextStream
from tangram.engine.errors import RequestError
from tangram.engine.request import OutputQueue, Request, RequestOutput, Status
from tangram.engine.runner import ModelRunner
from tangram.engine.sampling import SamplingParams, make_generator, sample
from tangram.engine.stages import StartCost, Totals
from tangram.kv import SeqSlot
from tangram.pool.loading import LoadFailed

log = logging.getLogger(__name__)
_ids = itertools.count()


class Engine:
    """Generation engine of one instance. `add_request`/`abort` are thread-safe; `step` runs on one thread."""

    def __init__(self, runner: ModelRunner, tokenizer, *, max_model_len: int, eos_token_ids: Iterable[int] = (),
                 max_batch: int = 16, max_prefill_tokens: int = 4096, max_kv_blocks: int | None = None,
                 start_cost: StartCost | None = None, ready_at: float | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.runner, self.kv, self.tokenizer = runner, runner.kv, tokenizer
        self.max_model_len, self.max_batch, self.max_prefill_tokens = max_model_len, max_batch, max_prefill_tokens
        self.max_kv_blocks = max_kv_blocks
        self.eos = set(eos_token_ids)
        self.start_cost, self.clock = start_cost, clock
        self.finalize_start: Callable[[], None] | None = None
        self.ready_at = clock() if ready_at is None else ready_at
        self.totals = Totals()
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order
        self.work = threading.Condition()  # notified on new requests and aborts
        self._incoming: deque[Request] = deque()
        self._aborts: set[str] = set()
        self._live: set[str] = set()
        self.stalled = False  # the last step could not admit or grow for lack of KV blocks
        self.failed: str | None = None  # why the instance can serve nothing more (its weights failed to load)
        self._phase: list[Request] = []  # the requests the running prefill/decode works on (a failure is theirs)

    # ------------------------------------------------------------------ requests in

    def encode(self, prompt: str | list[int] | list[dict], chat: bool = False) -> list[int]:
        """Prompt ids from text (chat: through the checkpoint's chat template), messages, or ids."""
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
            chat, messages = True, prompt
        elif isinstance(prompt, str):
            messages = [{"role": "user", "content": prompt}]
        else:
            return list(prompt)
        if chat:
            if not getattr(self.tokenizer, "chat_template", None):
                raise RequestError("this model has no chat template; send a plain prompt")
            enc = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                     return_dict=True)
            return list(enc["input_ids"])
        return list(self.tokenizer(prompt)["input_ids"])

    def add_request(self, prompt: str | list[int] | list[dict], params: SamplingParams | None = None, *,
                    request_id: str | None = None, sink: Callable[[RequestOutput], None] | None = None,
                    arrival: float | None = None, chat: bool = False) -> Request:
        """Queue a request; outputs go to `sink` (default: an OutputQueue at `request.sink`). Raises RequestError."""
        params = params or SamplingParams()
        ids = self.encode(prompt, chat)
        self._validate(ids, params)
        rid = request_id or f"req-{next(_ids)}"
        req = Request(rid, ids, params, self.clock() if arrival is None else arrival, sink or OutputQueue(),
                      TextStream(self.tokenizer, list(params.stop)), make_generator(params, self.kv.device()))
        with self.work:
            if rid in self._live:
                raise RequestError(f"request id {rid!r} is already in use")
            self._live.add(rid)
            self._incoming.append(req)
            self.work.notify_all()
        return req

    def _validate(self, ids: list[int], params: SamplingParams) -> None:
        if not ids:
            raise RequestError("the prompt is empty")
        vocab = self.runner.model.config.get_text_config().vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise RequestError(f"prompt token ids must be in [0, {vocab})")
        if len(ids) >= self.max_model_len:
            raise RequestError(f"the prompt has {len(ids)} tokens; the model's context is {self.max_model_len} "
                               "and at least one token must be generated")
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
        return bool(self._incoming or self.waiting or self.running or self._aborts)

    # ------------------------------------------------------------------ step

    def step(self) -> bool:
        """One engine iteration; False when nothing could progress (idle, or waiting for KV blocks)."""
        self._drain()
        if self.failed is not None:
            for req in [*self.waiting, *self.running]:
                self._finish(req, "error", error=self.failed, instance_failed=True)
            return False
        self.stalled = False
        progressed = self._guarded("prefill", self._prefill)
        return self._guarded("decode", self._decode) or progressed

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
            self.waiting.extend(self._incoming)
            self._incoming.clear()
            self._aborts.clear()  # every live request is failed now
        for req in [*self.waiting, *self.running]:
            try:
                self._finish(req, "error", error=error)
            except Exception:  # noqa: BLE001 - drop it by force: it must not stay to be stepped again
                log.exception("could not finish %s cleanly; dropping it", req.id)
                for queue in (self.running, self.waiting):
                    if req in queue:
                        queue.remove(req)
                req.status = Status.FINISHED
                with self.work:
                    self._live.discard(req.id)
                self._emit(req, RequestOutput(req.id, "", [], req.text.text, True, "error", error))

    def _guarded(self, what: str, phase: Callable[[], bool]) -> bool:
        """Run a prefill or decode phase; if it raises, fail the requests it was working on (when the weights
        failed to load, every request, now and later)."""
        self._phase = []
        try:
            return phase()
        except Exception as exc:  # noqa: BLE001 - a bad batch must not stop the engine
            batch = [r for r in self._phase if r.status is not Status.FINISHED]
            if not batch:
                raise
            log.exception("%s of %s failed", what, [r.id for r in batch])
            if isinstance(exc, LoadFailed):
                self.failed = str(exc)
                failing = {id(r) for r in batch}
                batch += [r for r in (*self.running, *self.waiting) if id(r) not in failing]
            for req in batch:
                if req.status is not Status.FINISHED:
                    self._finish(req, "error", error=f"{what} failed: {type(exc).__name__}: {exc}",
                                 instance_failed=self.failed is not None)
            return True
        finally:
            self._phase = []

    def _drain(self) -> None:
        with self.work:
            self.waiting.extend(self._incoming)
            self._incoming.clear()
            aborts, self._aborts = self._aborts, set()
        for req in [r for r in (*self.waiting, *self.running) if r.id in aborts]:
            self._finish(req, "abort")

    def _prefill(self) -> bool:
        """Admit waiting requests (FIFO) whose KV blocks can be had and prefill them in one forward."""
        n = scheduler.admit([len(r.ids) for r in self.waiting], len(self.running), self.max_batch,
                            self.max_prefill_tokens)
        t0 = self.clock()
        batch: list[Request] = []
        for _ in range(n):
            req = self.waiting[0]
            self._phase.append(req)
            blocks = self.kv.allocate(self.kv.spec.blocks_for(len(req.ids)))
            if blocks is None:
                self._phase.pop()
                self.stalled = True
                self.totals.kv_waits += 1
                break
            self.waiting.popleft()
            req.blocks, req.status = blocks, Status.RUNNING
            self.running.append(req)
            batch.append(req)
        if not batch:
            return False
        t1 = self.clock()
        logits = self.runner.prefill_batch([r.ids for r in batch], [self._offsets(r) for r in batch])
        t2 = self.clock()
        for req in batch:
            req.cached = len(req.ids)
            if req.first_token_at is None:
                st = req.stages
                st.queue_s = max(0.0, t0 - max(req.arrival, self.ready_at))
                st.kv_s, st.prefill_s = t1 - t0, t2 - t1
                st.prefill_interval = (t1 - req.arrival, t2 - req.arrival)
        self._postprocess(batch, logits)
        return True

    def _decode(self) -> bool:
        batch: list[Request] = []
        for req in list(self.running):
            if req.status is not Status.RUNNING:
                continue  # preempted below while growing an earlier sequence
            self._phase.append(req)
            if self._grow(req):
                batch.append(req)
        batch = [r for r in batch if r.status is Status.RUNNING]
        self._phase = list(batch)
        if not batch:
            return False
        t0 = self.clock()
        logits = self.runner.decode([r.ids[-1] for r in batch], [self._slot(r) for r in batch])
        for r in batch:
            r.cached += 1
        self.totals.decode_steps += 1
        self.totals.decode_s += self.clock() - t0
        self._postprocess(batch, logits)
        return True

    def _grow(self, req: Request) -> bool:
        """Give `req` the block its next token needs, preempting newer sequences if the pool has none."""
        while short := scheduler.blocks_short(req.cached, len(req.blocks), self.kv.spec.block_tokens):
            got = self.kv.allocate(short)
            if got is not None:
                req.blocks.extend(got)
                return True
            self.stalled = True
            victim = next(r for r in self.running if r.id == scheduler.victim([r.id for r in self.running]))
            self._preempt(victim)
            if victim is req:
                return False
        return True

    def _preempt(self, req: Request) -> None:
        self.kv.free(req.blocks)
        req.blocks, req.cached, req.status = [], 0, Status.WAITING
        self.running.remove(req)
        self.waiting.appendleft(req)
        self.totals.preemptions += 1
        log.debug("preempted %s (recomputed when blocks come back)", req.id)

    # ------------------------------------------------------------------ postprocess

    def _postprocess(self, batch: list[Request], logits) -> None:
        now = self.clock()
        for req, tok in zip(batch, self._sample(batch, logits)):
            if tok is None:
                continue  # its sampling failed: it is finished with the error
            try:
                self._advance(req, tok, now)
            except Exception as exc:  # noqa: BLE001 - detokenizing or stop checks of one request failed
                log.exception("postprocessing %s failed", req.id)
                if req.status is not Status.FINISHED:
                    self._finish(req, "error", error=f"postprocess failed: {type(exc).__name__}: {exc}")

    def _sample(self, batch: list[Request], logits) -> list[int | None]:
        """Next token per request; when the batch's sampling raises, each request alone, failing those whose
        own sampling raises (one request's parameters must not fail the others of its batch)."""
        try:
            return sample(logits, [r.params for r in batch], [r.generator for r in batch]).tolist()
        except Exception:  # noqa: BLE001
            log.warning("batched sampling of %s failed; sampling each alone", [r.id for r in batch], exc_info=True)
        tokens: list[int | None] = []
        for i, req in enumerate(batch):
            try:
                tokens.append(int(sample(logits[i:i + 1], [req.params], [req.generator])[0]))
            except Exception as exc:  # noqa: BLE001
                tokens.append(None)
                self._finish(req, "error", error=f"sampling failed: {type(exc).__name__}: {exc}")
        return tokens

    def _advance(self, req: Request, tok: int, now: float) -> None:
        """Append a sampled token to `req`, then stream it or finish the request."""
        req.output_ids.append(tok)
        if req.first_token_at is None:
            req.first_token_at = now
            req.stages.ttft_s = now - req.arrival
            if self.start_cost is not None:
                if self.finalize_start is not None:
                    self.finalize_start()  # a background load is over once a forward has used every weight
                if req.arrival <= self.ready_at:
                    req.stages.charge_start(self.start_cost)  # this request waited for the start
        p = req.params
        reason = None
        if (tok in self.eos and not p.ignore_eos) or tok in p.stop_token_ids:
            reason = "stop"
            delta = req.text.push(req.output_ids[:-1])  # the stop token is not part of the text
        else:
            delta = req.text.push(req.output_ids)
            if req.text.stopped:
                reason = "stop"
            elif len(req.output_ids) >= p.max_tokens or len(req.ids) >= self.max_model_len:
                reason = "length"
        if reason is None:
            self._emit(req, RequestOutput(req.id, delta, [tok], req.text.text, prompt_tokens=len(req.prompt_ids),
                                          completion_tokens=len(req.output_ids), stages=req.stages))
        else:
            self._finish(req, reason, delta=delta, new=[tok])

    def _finish(self, req: Request, reason: str, *, delta: str = "", new: list[int] | None = None,
                error: str | None = None, instance_failed: bool = False) -> None:
        if reason == "length":
            delta += req.text.flush(req.output_ids)
        self.kv.free(req.blocks)
        req.blocks, req.finish_reason = [], reason
        if req.status is Status.RUNNING:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        req.status = Status.FINISHED
        with self.work:
            self._live.discard(req.id)
        if req.first_token_at is not None:
            self.totals.add(req.stages, len(req.prompt_ids), len(req.output_ids))
        self._emit(req, RequestOutput(req.id, delta, new or [], req.text.text, True, reason, error,
                                      len(req.prompt_ids), len(req.output_ids), req.stages, list(req.output_ids),
                                      instance_failed))

    def _emit(self, req: Request, out: RequestOutput) -> None:
        try:
            req.sink(out)
        except Exception:  # noqa: BLE001 - a broken consumer aborts only its own request
            log.warning("output sink of %s failed; aborting it", req.id, exc_info=True)
            if not out.finished:
                self.abort(req.id)

    def _offsets(self, req: Request) -> list[int]:
        return [self.kv.offset(b) for b in req.blocks]

    def _slot(self, req: Request) -> SeqSlot:
        return SeqSlot(self._offsets(req), req.cached)

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
        for req in [*self.waiting, *self.running]:
            self._finish(req, "abort")
