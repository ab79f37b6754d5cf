"""The vLLM engine backend: an instance is a vLLM engine process (a shell) bound to weights in Tangram's pool.

A start acquires the model in the device pool (cold: Tangram's loader and host DRAM tier read what is missing;
pool hit: nothing), charges the engine's KV cache and its own copy of the weights to the pool as active bytes,
then takes a warm shell of the model's shape and re-binds its weights from the pool, or spawns one that loads
from the pool as it builds. Prompts are tokenized here (the same chat templates as the built-in engine); vLLM
samples, detokenizes and stops. Its process dying fails only its own requests (`instance_failed`).
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
import time
from pathlib import Path

import torch

from tangram.engine.backend import Sink
from tangram.engine.errors import EngineError
from tangram.engine.instance import EngineConfig
from tangram.engine.logprobs import Candidate, TokenLogprob
from tangram.engine.prompt import Prompt, check_prompt, encode_prompt
from tangram.engine.request import RequestOutput
from tangram.engine.sampling import SamplingParams
from tangram.engine.skeleton import RUNTIME
from tangram.engine.stages import EngineRates, Stages, StartCost
from tangram.pool import DevicePool
from tangram.store import Checkpoint, LoadStats
from tangram.vllm.adapters import VllmAdapters
from tangram.vllm.binding import bind_spec, unstage, weights_identity
from tangram.vllm.messages import BindSpec, Delta, LoraRef, ShellSetup
from tangram.vllm.params import vllm_sampling
from tangram.vllm.python import vllm_python
from tangram.vllm.shell import Shell, ShellError
from tangram.vllm.shells import shell_key, shells_for

log = logging.getLogger(__name__)
_ids = itertools.count()
FINISH = {"stop": "stop", "length": "length", "abort": "abort"}  # anything else vLLM says is an error


def engine_args(path: Path, config: EngineConfig) -> dict:
    """vLLM EngineArgs keywords of an instance: the checkpoint directory for config and tokenizer, eager mode (as
    bench serve runs plain vLLM), the dtype and KV size asked for, vLLM's defaults otherwise."""
    args: dict = {"model": str(path), "tokenizer": str(path), "enforce_eager": True,
                  "dtype": "auto" if config.dtype == "auto" else config.dtype,
                  "kv_cache_memory_bytes": config.kv_cache_bytes}
    if config.max_model_len is not None:
        args["max_model_len"] = config.max_model_len
    if config.max_batch is not None:
        args["max_num_seqs"] = config.max_batch
    if config.max_loras:
        args.update(enable_lora=True, max_loras=config.max_loras, max_lora_rank=config.max_lora_rank)
    return args


def prewarm(checkpoint: Path, pool: DevicePool, config: EngineConfig) -> float:
    """Build an unbound shell of `checkpoint`'s shape on a thread, parked for its first start (which then only
    loads into the pool and binds); seconds spent here. Without vLLM: nothing (the start reports it)."""
    t0 = time.perf_counter()
    found = vllm_python()
    if found.python is None:
        return 0.0
    args = engine_args(checkpoint, config)
    key = shell_key(checkpoint, args, str(pool.device))
    python = found.python
    if shells_for(pool).prewarm(key, lambda: Shell.spawn(python, ShellSetup(args, None), key)):
        log.info("pre-warming a vLLM shell for %s on %s", checkpoint, pool.device)
    RUNTIME.tokenizer(checkpoint)  # the start tokenizes here: loaded once, now
    return time.perf_counter() - t0


class VllmBackend:
    """A vLLM engine behind the backend contract (`tangram.engine.backend.EngineBackend`)."""

    def __init__(self, checkpoint: Checkpoint, pool: DevicePool, config: EngineConfig, *, name: str,
                 arrival: float) -> None:
        found = vllm_python()
        if found.python is None:
            raise EngineError(f"the vllm backend needs vLLM: {found.note} (`make install-vllm`, or set "
                              "$TANGRAM_VLLM_PYTHON to an interpreter that has it)")
        self.pool, self.config, self.name = pool, config, name
        self.shells = shells_for(pool)
        t0 = time.perf_counter()
        self.binding = pool.acquire(checkpoint, model=name)
        t1 = time.perf_counter()
        self.kv = None
        self.shell: Shell | None = None
        try:
            self.kv = pool.kv_region(config.kv_cache_bytes + self.binding.bytes_loaded + self.binding.bytes_reused,
                                     torch.uint8, reserve_blocks=1)
            spec, staging = bind_spec(pool, self.binding, weights_identity(checkpoint.index))
            args = engine_args(checkpoint.path, config)
            key = shell_key(checkpoint.path, args, str(pool.device))
            warm = self.shells.take(key)
            self.warm_shell = warm is not None  # re-bound (TIDAL's template path), else spawned
            self.bind_s = 0.0
            try:
                self.shell = self._bound(warm, spec)
                if self.shell is None:
                    self.shell = Shell.spawn(found.python, ShellSetup(args, spec), key)
                    self.shells.serving(key)
            finally:
                unstage(staging)
            self.tokenizer = RUNTIME.tokenizer(checkpoint.path)
            self.adapters = VllmAdapters(pool, checkpoint, self.shell, max_loras=config.max_loras,
                                         max_rank=config.max_lora_rank)
        except BaseException:
            if self.shell is not None:  # a start that failed after it got its engine: that engine goes too
                self.shells.done(self.shell.key)
                self.shell.stop()
            self._release()
            raise
        t2 = time.perf_counter()
        b = self.binding
        stats = b.load
        # load: bytes into the pool (Tangram's loader); init: the engine, i.e. a shell spawned, or a warm one re-bound
        # (vLLM's parameters filled from the pool, packed for its kernels)
        self.cost = StartCost(start=StartCost.classify(b.bytes_loaded, stats.bytes_from_cache if stats else 0),
                              init_s=t2 - t1, load_s=t1 - t0, bytes_loaded=b.bytes_loaded,
                              bytes_reused=b.bytes_reused, load_begin=t0 - arrival, load_end=t1 - arrival)
        self.ready_at = t2
        cfg = json.loads((checkpoint.path / "config.json").read_text())
        text = cfg.get("text_config", cfg)
        self.vocab = int(text["vocab_size"])
        self.max_model_len = config.max_model_len or int(text.get("max_position_embeddings", 2048))
        self._prefill = (0, 0.0)  # finished requests, their summed time to first token
        self._lock = threading.Lock()
        log.info("started %s on %s with vLLM (%s shell): %s, load %.3f s (%d B loaded), init %.3f s", name,
                 pool.device, "warm" if self.warm_shell else "new", self.cost.start, self.cost.load_s, b.bytes_loaded,
                 self.cost.init_s)

    def _bound(self, warm: Shell | None, spec: BindSpec) -> Shell | None:
        """`warm` re-bound to `spec`, or None (no warm shell, or it died binding: a new one is spawned instead)."""
        if warm is None:
            return None
        if warm.bound == spec.key:  # it still holds exactly these weights (same content keys): nothing to copy
            log.info("the warm vLLM shell already holds these weights: no re-bind")
            return warm
        try:
            self.bind_s = warm.bind(spec)
        except ShellError as exc:
            log.warning("a warm vLLM shell failed to bind (%s): spawning a new one", exc)
            self.warm_shell = False
            self.shells.done(warm.key)
            return None
        return warm

    def submit(self, prompt: Prompt, params: SamplingParams, sink: Sink, *, arrival: float, chat: bool = False,
               adapter: str | None = None) -> str:
        """Tokenize and check here, bind its LoRA adapter (`adapter`: a converted adapter's path), then queue on the
        vLLM engine; its id. Raises RequestError."""
        ids = encode_prompt(self.tokenizer, prompt, chat)
        check_prompt(ids, params, vocab=self.vocab, max_model_len=self.max_model_len)
        sampling = vllm_sampling(params)
        rid = f"vllm-{next(_ids)}"
        lora = None
        try:
            if adapter is not None:
                lora = self.adapters.acquire(adapter)
            stream = _Stream(self, rid, len(ids), params, sink, arrival, lora)
            self.shell.add(rid, ids, sampling, stream.on_delta, lora)
        except ShellError as exc:  # the engine process is gone: this instance is failed, the request may retry
            if lora is not None:
                self.adapters.release(lora)
            sink(RequestOutput(rid, "", [], "", finished=True, finish_reason="error", error=str(exc),
                               prompt_tokens=len(ids), instance_failed=True))
        return rid

    def abort(self, request_id: str) -> None:
        """Stop a request; vLLM frees its KV blocks."""
        self.shell.abort(request_id)

    def health(self) -> str | None:
        """Why the engine can serve nothing more (its process died), or None."""
        return self.shell.dead

    def final_cost(self) -> StartCost:
        """The start's cost (the load is over before the engine is bound)."""
        return self.cost

    def load_stats(self) -> LoadStats | None:
        """What the start's load read, from where."""
        return self.binding.load

    def freeable_bytes(self) -> int:
        """Weights no other instance on the pool holds, plus the KV and weight copy charged for the engine."""
        return self.pool.exclusive_bytes(self.binding) + (self.kv.reserved_bytes if self.kv else 0)

    def mean_prefill_s(self, prior: float) -> float:
        """Mean time to first token of the finished requests (`prior` before the first)."""
        n, total = self._prefill
        return total / n if n else prior

    def rates(self) -> EngineRates:
        """Not measured: vLLM's engine steps in its own process, and its requests do not migrate."""
        return EngineRates()

    def finished(self, ttft: float) -> None:
        """A request ended; fold its time to first token in."""
        with self._lock:
            n, total = self._prefill
            self._prefill = (n + 1, total + ttft)

    def stop(self) -> None:
        """Abort what runs, park the shell for the next start of this shape, release the weights (retained)."""
        shell = self.shell
        self.adapters.close()  # before it can be parked: a shell bound to another model must hold no old views
        self.shells.done(shell.key)
        if shell.alive() and shell.running() == 0:
            self.shells.park(shell)
        else:
            shell.stop()  # requests still running are ended by the process exit
        self._release()

    def _release(self) -> None:
        if self.kv is not None:
            self.kv.close()
        self.pool.release(self.binding)


class _Stream:
    """One request's deltas from the shell as Tangram `RequestOutput`s, in order, to the request's sink."""

    def __init__(self, backend: VllmBackend, rid: str, prompt_tokens: int, params: SamplingParams, sink: Sink,
                 arrival: float, lora: LoraRef | None = None) -> None:
        self.backend, self.rid, self.prompt_tokens, self.sink = backend, rid, prompt_tokens, sink
        self.lora = lora
        self.arrival = arrival
        self.texts = [""] * params.n
        self.ids: list[list[int]] = [[] for _ in range(params.n)]
        self.stages = Stages()
        if arrival <= backend.ready_at:  # it waited for this start
            self.stages.charge_start(backend.cost)
        self.first: float | None = None

    def on_delta(self, d: Delta) -> None:
        """Route one delta (called on the shell's reader thread)."""
        if d.token_ids and self.first is None:
            self.first = time.perf_counter()
            st = self.stages
            st.ttft_s = self.first - self.arrival
            st.prefill_s = max(0.0, st.ttft_s - st.init_s - st.load_s)
            st.prefill_interval = (st.ttft_s - st.prefill_s, st.ttft_s)
        i = d.index if d.index < len(self.texts) else 0
        self.texts[i] += d.text
        self.ids[i] += d.token_ids
        reason = None if d.finish_reason is None else FINISH.get(d.finish_reason, "error")
        failed = d.error is not None and self.backend.shell.dead is not None
        out = RequestOutput(self.rid, d.text, list(d.token_ids), self.texts[i], finished=d.finished,
                            finish_reason=reason, error=d.error, prompt_tokens=d.prompt_tokens or self.prompt_tokens,
                            completion_tokens=sum(len(x) for x in self.ids), stages=self.stages, index=i,
                            logprobs=_token_logprobs(d.logprobs), instance_failed=failed)
        if d.finished:
            out.output_ids = list(self.ids[i])
            self.backend.finished(self.stages.ttft_s)
            if self.lora is not None:
                self.backend.adapters.release(self.lora)
        self.sink(out)


def _token_logprobs(entries: list | None) -> list[TokenLogprob] | None:
    if entries is None:
        return None
    return [TokenLogprob(tok, text, lp, [Candidate(i, t, v) for i, t, v in top]) for tok, text, lp, top in entries]
