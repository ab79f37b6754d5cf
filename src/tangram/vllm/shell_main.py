"""A vLLM shell: one vLLM engine in this process, driven by its parent over a connection.

Run as `<vllm python> -m tangram.vllm.shell_main FD PARENT_PID`: it reads a `ShellSetup`, builds the engine
(vLLM's `LLMEngine`, its engine core in this process) with the `tangram` model loader, answers `Ready`, then
serves `Add` / `Abort` / `Bind` / `BindLora` / `DropLora` / `Stop`, stepping the engine while requests run and
sending each step's `Deltas`. It exits on `Stop` or when the connection closes (its parent ended).
"""

from __future__ import annotations

import logging
import os
import sys
import time
import traceback
from multiprocessing.connection import Connection

from tangram.vllm.messages import (Abort, Add, Bind, BindLora, Bound, Delta, Deltas, DropLora, Failed, LoraBound,
                                   LoraDropped, LoraRef, Ready, ShellSetup, Stop)

log = logging.getLogger("tangram.vllm.shell")


def _parent_alive(parent: int) -> None:
    # No PR_SET_PDEATHSIG: it fires when the *thread* that spawned us ends (a pre-warm thread does, at once).
    # The parent's end of the connection closes when its process ends; recv then raises EOFError and we exit.
    if os.getppid() != parent:
        sys.exit(0)  # the parent is already gone


def _logprobs(ids: list[int], entries, k: int) -> list | None:
    """vLLM's per-token {id: Logprob} dicts (the k most likely, and the chosen one wherever it ranks) as
    (id, token, logprob, [(id, token, logprob) of the k most likely, by rank]) tuples."""
    if entries is None:
        return None
    out = []
    for tok, d in zip(ids, entries):
        chosen = d[tok]
        top = sorted(((i, lp) for i, lp in d.items() if lp.rank is not None and 1 <= lp.rank <= k),
                     key=lambda x: x[1].rank)
        out.append((tok, chosen.decoded_token or "", chosen.logprob,
                    [(i, lp.decoded_token or "", lp.logprob) for i, lp in top]))
    return out


class Shell:
    """The engine and the command loop of this process."""

    def __init__(self, conn: Connection, engine, sampling_type, delta_kind, structured_type, lora_type) -> None:
        self.conn, self.engine = conn, engine
        self.lora_type = lora_type
        self.top_k: dict[str, int] = {}  # top logprobs asked for, by request
        self.sampling_type, self.delta_kind, self.structured_type = sampling_type, delta_kind, structured_type

    def handle(self, msg) -> bool:
        """Run one command; False on `Stop`."""
        if isinstance(msg, Add):
            self.add(msg)
        elif isinstance(msg, Abort):
            self.engine.abort_request([msg.request_id])
            self.top_k.pop(msg.request_id, None)
            self.conn.send(Deltas([Delta(msg.request_id, 0, "", [], "abort", finished=True)]))
        elif isinstance(msg, Bind):
            self.bind(msg)
        elif isinstance(msg, BindLora):
            self.bind_lora(msg)
        elif isinstance(msg, DropLora):
            self.drop_lora(msg)
        elif isinstance(msg, Stop):
            return False
        return True

    def add(self, msg: Add) -> None:
        """Queue a request; a request vLLM rejects ends at once with its error."""
        try:
            kw = dict(msg.sampling)
            so = kw.pop("structured_outputs", None)
            if so is not None:
                kw["structured_outputs"] = self.structured_type(**so)
            params = self.sampling_type(**kw, output_kind=self.delta_kind)
            lora = None if msg.lora is None else self._lora(msg.lora)
            self.engine.add_request(msg.request_id, {"prompt_token_ids": msg.prompt_ids}, params, lora_request=lora)
            if kw.get("logprobs") is not None:
                self.top_k[msg.request_id] = kw["logprobs"]
        except Exception as exc:  # noqa: BLE001 - vLLM's validation errors are the request's, not the shell's
            self.conn.send(Deltas([Delta(msg.request_id, 0, "", [], "error", finished=True, error=str(exc))]))

    def bind(self, msg: Bind) -> None:
        """Reload the weights in place from the pool, then drop cached prefixes (they hold the old model's KV)."""
        from tangram.vllm.loader import bind_on_worker

        t0 = time.perf_counter()
        try:
            self.engine.collective_rpc(bind_on_worker, args=(msg.spec,))
            self.engine.reset_prefix_cache()
        except Exception as exc:  # noqa: BLE001 - half-bound weights: this shell must not serve again
            self.conn.send(Failed(f"binding the weights failed: {exc}", fatal=True))
            raise
        self.conn.send(Bound(time.perf_counter() - t0))

    def _lora(self, ref: LoraRef):
        return self.lora_type(ref.name, ref.lora_id, ref.path)

    def bind_lora(self, msg: BindLora) -> None:
        """Load an adapter into vLLM from the pool's tensors; an adapter vLLM refuses fails alone."""
        from tangram.vllm import lora

        t0 = time.perf_counter()
        lora.bind(msg.lora.lora_id, msg.spec)
        try:
            self.engine.add_lora(self._lora(msg.lora))
        except Exception as exc:  # noqa: BLE001 - vLLM's checks of the adapter (rank, modules) are the adapter's
            lora.unbind(msg.lora.lora_id)
            self.conn.send(Failed(f"vLLM refused the LoRA adapter: {type(exc).__name__}: {exc}"))
            return
        self.conn.send(LoraBound(msg.lora.lora_id, time.perf_counter() - t0))

    def drop_lora(self, msg: DropLora) -> None:
        """Remove an adapter from vLLM, then its views of the pool (the parent releases its binding on reply)."""
        from tangram.vllm import lora

        try:
            self.engine.remove_lora(msg.lora_id)
        except Exception:  # noqa: BLE001 - not loaded (vLLM refused it): nothing of it is left to remove
            log.warning("removing LoRA adapter %d:\n%s", msg.lora_id, traceback.format_exc())
        lora.unbind(msg.lora_id)
        self.conn.send(LoraDropped(msg.lora_id))

    def step(self) -> None:
        """One engine step; its outputs to the parent."""
        items = []
        for o in self.engine.step():
            outs = list(o.outputs)
            for j, c in enumerate(outs):
                ids = list(c.token_ids)
                k = self.top_k.get(o.request_id, 0)
                items.append(Delta(o.request_id, c.index, c.text, ids, c.finish_reason,
                                   finished=o.finished and j == len(outs) - 1,  # the request's very last delta
                                   prompt_tokens=len(o.prompt_token_ids or ()), logprobs=_logprobs(ids, c.logprobs, k)))
            if o.finished:
                self.top_k.pop(o.request_id, None)
        if items:
            self.conn.send(Deltas(items))

    def run(self) -> None:
        """Serve until `Stop` or the connection closes."""
        while True:
            if not self.engine.has_unfinished_requests() and not self.handle(self.conn.recv()):
                return
            while self.conn.poll():
                if not self.handle(self.conn.recv()):
                    return
            if self.engine.has_unfinished_requests():
                self.step()


def main(argv: list[str]) -> int:
    """Build the engine the parent asks for and serve it."""
    fd, parent = int(argv[1]), int(argv[2])
    _parent_alive(parent)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    conn = Connection(fd)
    setup: ShellSetup = conn.recv()
    t0 = time.perf_counter()
    try:
        import vllm
        from vllm import SamplingParams
        from vllm.engine.arg_utils import EngineArgs
        from vllm.lora.request import LoRARequest
        from vllm.platforms import current_platform
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams
        from vllm.v1.engine.llm_engine import LLMEngine

        from tangram.vllm import loader, plugin

        import_s = time.perf_counter() - t0
        plugin.register()  # the entry point registers it too; this makes a missing install a clear error below
        extra = {}
        if setup.bind is not None:
            loader.PENDING.append(setup.bind)
            extra = loader.spec_to_config(setup.bind)
        args = EngineArgs(**setup.engine_args, load_format=plugin.LOAD_FORMAT, model_loader_extra_config=extra)
        if args.enable_lora and current_platform.is_cpu():
            from tangram.vllm.lora import fix_no_lora_rows

            fix_no_lora_rows()
        engine = LLMEngine.from_engine_args(args)
        loader.PENDING.clear()
        if args.enable_lora:
            from tangram.vllm.lora import use_pool_loras

            engine.collective_rpc(use_pool_loras)
        kv_tokens = int(getattr(engine.vllm_config.cache_config, "num_gpu_blocks", 0) or 0) * int(
            engine.vllm_config.cache_config.block_size or 0)
    except Exception as exc:  # noqa: BLE001 - whatever stops the build is reported to the parent
        log.error("building the vLLM engine failed:\n%s", traceback.format_exc())
        conn.send(Failed(f"building the vLLM engine failed: {type(exc).__name__}: {exc}", fatal=True))
        return 1
    conn.send(Ready(time.perf_counter() - t0, import_s, sum(loader.LOADS), vllm.__version__, kv_tokens))
    try:
        Shell(conn, engine, SamplingParams, RequestOutputKind.DELTA, StructuredOutputsParams, LoRARequest).run()
    except (EOFError, OSError):
        pass  # the parent went away
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
