"""The parent's side of a vLLM shell: the process, its connection, and the thread that routes its outputs.

`Shell.spawn` starts `<vllm python> -m tangram.vllm.shell_main` with one end of a socket pair, sends the
`ShellSetup` and waits for `Ready`. A reader thread routes each `Delta` to the sink its request registered;
when the process dies, every request still running gets a last output that says so (`instance_failed`), and
`health()` says why.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path

import tangram
from tangram.paths import data_dir
from tangram.vllm.messages import (Abort, Add, Bind, BindLora, Bound, Delta, Deltas, DropLora, Failed, LoraBound,
                                   LoraDropped, LoraRef, Ready, ShellSetup, Stop)

log = logging.getLogger(__name__)
DeltaSink = Callable[[Delta], None]
READY_TIMEOUT_S = 600.0  # a first start imports vLLM and builds its engine
BIND_TIMEOUT_S = 300.0
LORA_TIMEOUT_S = 120.0


class ShellError(RuntimeError):
    """A vLLM shell could not start, bind, or went away."""


class Shell:
    """One vLLM engine process. Thread-safe; sinks are called on the reader thread."""

    def __init__(self, proc: subprocess.Popen, conn: Connection, log_path: Path, key: str) -> None:
        self.proc, self.conn, self.log_path, self.key = proc, conn, log_path, key
        self.ready: Ready | None = None
        self.bound: str | None = None  # the content identity of the weights its engine holds (None: zeros)
        self._send = threading.Lock()
        self._rpc = threading.Lock()  # one command that waits for its reply at a time
        self._dropping: dict[int, Callable[[], None]] = {}  # DropLora sent, by lora id: called once it is done
        self._sinks: dict[str, DeltaSink] = {}
        self._replies: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self.dead: str | None = None
        self._reader = threading.Thread(target=self._read, name=f"vllm-shell-{proc.pid}", daemon=True)

    @classmethod
    def spawn(cls, python: str, setup: ShellSetup, key: str, env: dict[str, str] | None = None) -> Shell:
        """Start a shell and wait until its engine is built (blocking: imports vLLM, builds the model)."""
        parent, child = socket.socketpair()
        logs = data_dir() / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log_path = logs / f"vllm-shell-{os.getpid()}-{time.monotonic_ns()}.log"
        src = str(Path(tangram.__file__).resolve().parents[1])  # the shell runs this same Tangram
        full_env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])),
                    "VLLM_ENABLE_V1_MULTIPROCESSING": "0", **(env or {})}
        with open(log_path, "wb") as out:
            proc = subprocess.Popen([python, "-m", "tangram.vllm.shell_main", str(child.fileno()), str(os.getpid())],
                                    pass_fds=[child.fileno()], stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, env=full_env)
        child.close()
        shell = cls(proc, Connection(os.dup(parent.fileno())), log_path, key)
        parent.close()
        shell._reader.start()
        try:
            shell.conn.send(setup)
            reply = shell._reply(READY_TIMEOUT_S)
        except (OSError, ShellError) as exc:
            shell.kill()
            raise ShellError(f"the vLLM shell did not start: {exc}\n{shell.log_tail()}") from None
        if not isinstance(reply, Ready):
            shell.kill()
            raise ShellError(f"the vLLM shell did not start: {getattr(reply, 'error', reply)}\n{shell.log_tail()}")
        shell.ready = reply
        shell.bound = setup.bind.key if setup.bind is not None else None
        log.info("vLLM shell %d ready in %.2f s (import %.2f s), vLLM %s, %d KV tokens", proc.pid, reply.seconds,
                 reply.import_s, reply.vllm_version, reply.kv_tokens)
        return shell

    def _reply(self, timeout: float):
        try:
            return self._replies.get(timeout=timeout)
        except queue.Empty:
            raise ShellError(f"no answer from the vLLM shell in {timeout:.0f} s") from None

    def _read(self) -> None:
        while True:
            try:
                msg = self.conn.recv()
            except (EOFError, OSError):
                break
            if isinstance(msg, Deltas):
                for d in msg.items:
                    self._route(d)
            elif isinstance(msg, LoraDropped):
                self._dropped(msg.lora_id)
            else:
                if isinstance(msg, Failed) and msg.fatal:
                    self.dead = msg.error
                self._replies.put(msg)
        code = self.proc.wait()
        self.dead = self.dead or f"the vLLM engine process exited (code {code})"
        self._replies.put(Failed(self.dead, fatal=True))
        with self._lock:
            sinks, self._sinks = list(self._sinks.items()), {}
        for rid, sink in sinks:
            sink(Delta(rid, 0, "", [], "error", finished=True, error=self.dead))
        with self._lock:
            dropping = list(self._dropping)
        for lora_id in dropping:  # a dead process holds no view of anything
            self._dropped(lora_id)

    def _dropped(self, lora_id: int) -> None:
        with self._lock:
            done = self._dropping.pop(lora_id, None)
        if done is not None:
            done()

    def _route(self, d: Delta) -> None:
        with self._lock:
            sink = self._sinks.pop(d.request_id, None) if d.finished else self._sinks.get(d.request_id)
        if sink is not None:
            sink(d)

    def _post(self, msg) -> None:
        with self._send:
            self.conn.send(msg)

    def bind(self, spec) -> float:
        """Load new weights into the engine in place; seconds it took. Raises ShellError (the shell is then dead)."""
        with self._rpc:
            self._post(Bind(spec))
            reply = self._reply(BIND_TIMEOUT_S)
        if not isinstance(reply, Bound):
            self.kill()
            raise ShellError(f"binding weights in the vLLM shell failed: {getattr(reply, 'error', reply)}")
        self.bound = spec.key
        return reply.seconds

    def bind_lora(self, lora: LoraRef, spec) -> float:
        """Load a LoRA adapter into the engine from the pool's tensors (`spec`); seconds it took. Raises ShellError
        when the shell is gone, ValueError when vLLM refuses the adapter (the shell serves on)."""
        with self._rpc:
            if self.dead is not None:
                raise ShellError(self.dead)
            try:
                self._post(BindLora(lora, spec))
            except OSError as exc:
                raise ShellError(f"the vLLM engine process is gone: {exc}") from None
            reply = self._reply(LORA_TIMEOUT_S)
        if isinstance(reply, LoraBound) and reply.lora_id == lora.lora_id:
            return reply.seconds
        if isinstance(reply, Failed) and not reply.fatal:
            raise ValueError(reply.error)
        raise ShellError(getattr(reply, "error", f"unexpected answer from the vLLM shell: {reply!r}"))

    def drop_lora(self, lora_id: int, done: Callable[[], None]) -> None:
        """Remove a LoRA adapter from the engine; `done` is called (on the reader thread, or now when the shell is
        gone) once the shell holds no view of its tensors."""
        with self._lock:
            self._dropping[lora_id] = done
            gone = self.dead is not None
        if not gone:
            try:
                self._post(DropLora(lora_id))
                return
            except OSError:
                pass
        self._dropped(lora_id)

    def add(self, request_id: str, prompt_ids: list[int], sampling: dict, sink: DeltaSink,
            lora: LoraRef | None = None) -> None:
        """Queue a request (with a bound LoRA adapter); its deltas go to `sink`. Raises ShellError when the shell
        is gone."""
        with self._lock:
            if self.dead is not None:
                raise ShellError(self.dead)
            self._sinks[request_id] = sink
        try:
            self._post(Add(request_id, prompt_ids, sampling, lora))
        except OSError as exc:
            with self._lock:
                self._sinks.pop(request_id, None)
            raise ShellError(f"the vLLM engine process is gone: {exc}") from None

    def abort(self, request_id: str) -> None:
        """Stop a request (its sink gets a last, finished delta)."""
        try:
            self._post(Abort(request_id))
        except OSError:
            pass  # a dead shell has already ended its requests

    def running(self) -> int:
        """Requests queued or running in the shell."""
        with self._lock:
            return len(self._sinks)

    def alive(self) -> bool:
        """Whether the process runs and can serve."""
        return self.dead is None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the shell to exit; kill it if it does not."""
        try:
            self._post(Stop())
            self.proc.wait(timeout)
        except (OSError, subprocess.TimeoutExpired):
            self.kill()

    def kill(self) -> None:
        """End the process now."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of the shell's log."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""
