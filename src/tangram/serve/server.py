"""The server: API and controller in this process (uvicorn), with one worker per device.

Embedded (default): the workers run in this process, one per local device.
Cluster (`ray_address` given): the workers are Ray actors placed across the
Ray cluster (`tangram.cluster`); the API and controller stay here, on the head.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from tangram.control import Deployment, LoraController, ServeConfig
from tangram.control.migrate import MigrationSettings
from tangram.heap import freeze_startup_heap, thaw_heap
from tangram.paths import data_dir
from tangram.pool.capacity import configured_capacity, format_bytes, plan_capacities
from tangram.scheduler.adapter import shared_estimator
from tangram.serve.app import create_app
from tangram.store import HostCache, Loader
from tangram.store.probe_auto import probe_in_background
from tangram.worker import Worker, local_devices

log = logging.getLogger(__name__)

DEMO = Deployment(name="demo", checkpoint="demo", keep_alive_s=300)
API_KEY_ENV = "TANGRAM_API_KEY"
MIN_REMOTE_TOKEN = 16  # characters of an admin token that guards a non-loopback bind
# An idle HTTP connection is kept this long. httpx (and so the openai client) retires pooled connections after
# 5 s idle, uvicorn's default: at equal timeouts a request sent as the server closes the connection failed
# with a ReadError (one request of a bench coldstart replay). Longer here, the client always closes first.
HTTP_KEEP_ALIVE_S = 30


def token_file(port: int) -> Path:
    """Where the admin token of the local server listening on `port` is kept for the CLI (mode 0600)."""
    return data_dir() / f"admin-token-{port}"


def is_loopback(host: str) -> bool:
    """Whether `host` only listens on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve_token(config: ServeConfig) -> tuple[str, bool]:
    """The admin token and whether it was generated; refuses a non-loopback bind without a configured token."""
    token = config.admin_token or os.environ.get("TANGRAM_ADMIN_TOKEN")
    if not is_loopback(config.host):
        if not token:
            raise ValueError(f"refusing to listen on {config.host} without an admin token: set admin_token in "
                             "the config or TANGRAM_ADMIN_TOKEN")
        if len(token) < MIN_REMOTE_TOKEN:
            raise ValueError(f"refusing to listen on {config.host} with an admin token of {len(token)} characters: "
                             f"use at least {MIN_REMOTE_TOKEN} (for example the output of "
                             "`python -c 'import secrets; print(secrets.token_urlsafe(24))'`)")
    if token:
        return token, False
    return secrets.token_urlsafe(24), True


def resolve_api_key(config: ServeConfig) -> str | None:
    """The key /v1/* requires (config, else $TANGRAM_API_KEY), or None for an open inference API."""
    key = config.api_key or os.environ.get(API_KEY_ENV) or None
    if key is not None and (not key.strip() or any(c.isspace() for c in key)):
        raise ValueError(f"{API_KEY_ENV}: an API key must not contain whitespace")
    if key is None and not is_loopback(config.host):
        log.warning("listening on %s without an API key: /v1/* is open to anyone who can reach it "
                    "(set --api-key or %s)", config.host, API_KEY_ENV)
    return key


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port; OSError (naming the address) when it is taken or not allowed."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named: asyncio sets TCP_NODELAY on accepted connections only for sockets that say they are TCP;
    # with protocol 0 Nagle held every streamed chunk for the client's delayed ACK (~40 ms on the first one)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        # Listen at once: on Linux two SO_REUSEADDR sockets may both bind a port while neither listens.
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def build_workers(config: ServeConfig) -> tuple[list[Worker], list[str]]:
    """One worker per local device, sharing one host DRAM cache tier; and one line per pool saying its
    capacity and how it was chosen (also logged)."""
    devices = local_devices(config.cpu_devices)
    cache = HostCache(config.host_cache_bytes) if config.host_cache_bytes else None
    loader = Loader(cache=cache)
    plan = plan_capacities(configured_capacity(config.pool_capacity), devices)
    workers = [Worker(i, d, nbytes, loader, pool=config.pool) for i, (d, (nbytes, _)) in enumerate(zip(devices, plan))]
    lines = [f"pool {w.name}: {format_bytes(w.pool.capacity)} ({how})" for w, (_, how) in zip(workers, plan)]
    for line in lines:
        log.info("%s", line)
    return workers, lines


class Server:
    """A configured server; `run()` blocks, `running()` serves from a thread (tests, benchmarks)."""

    def __init__(self, config: ServeConfig | None = None, ray_address: str | None = None) -> None:
        """`ray_address`: None for the embedded deployment; a Ray address, or "" for a local Ray, for cluster mode."""
        self.config = config or ServeConfig()
        self.token, self.generated_token = resolve_token(self.config)
        self.api_key = resolve_api_key(self.config)
        # Bind first: a port in use fails here, before any pool, deployment or token file is touched.
        self._socket = bind_socket(self.config.host, self.config.port)
        self.port: int = self._socket.getsockname()[1]
        self._token_saved = False
        self.cluster = None
        try:
            if ray_address is None:
                self.workers, self.pool_lines = build_workers(self.config)
            else:
                from tangram.cluster import RayCluster

                self.cluster = RayCluster.connect(self.config, ray_address)
                self.workers = self.cluster.workers
                self.pool_lines = [f"pool {w.name}: {format_bytes(w.capacity)}" for w in self.workers]
            shared_estimator()  # tier bandwidths for placement, measured (or read from the probe) before serving
            self.controller = LoraController(self.workers, self.config.scheduler)  # with adapter deployments
            self.controller.migrator.settings = MigrationSettings(auto=self.config.migration)
            self.app: FastAPI = create_app(self.controller, admin_token=self.token, api_key=self.api_key)
        except BaseException:
            self.close()
            raise
        self.app.router.lifespan_context = self._lifespan
        self._uvicorn: uvicorn.Server | None = None

    @contextlib.asynccontextmanager
    async def _lifespan(self, _app: FastAPI):
        for spec in sorted(self.config.deployments or [DEMO], key=lambda d: d.adapter is not None):  # bases first
            try:
                await self.controller.deploy(spec)
            except Exception:  # noqa: BLE001 - one bad deployment must not keep the others down
                log.exception("deployment %s failed; serving the others", spec.name)
        # read speed of this machine's disks, if never measured: on a thread, loads use the default meanwhile
        probe_in_background(Path(self.controller.describe(n)["resolved_checkpoint"]) for n in self.controller.names())
        freeze_startup_heap()
        try:
            yield
        finally:
            thaw_heap()
        await self.controller.shutdown()

    @property
    def url(self) -> str:
        """Base URL, with the bound port."""
        host = self.config.host
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    @property
    def token_path(self) -> Path:
        """The token file of this server's port (where the local CLI finds the admin token)."""
        return token_file(self.port)

    def _make(self) -> uvicorn.Server:
        cfg = uvicorn.Config(self.app, host=self.config.host, port=self.config.port, log_level="warning",
                             lifespan="on", timeout_graceful_shutdown=5,
                             timeout_keep_alive=HTTP_KEEP_ALIVE_S)
        self._uvicorn = uvicorn.Server(cfg)
        return self._uvicorn

    def save_token(self) -> None:
        """Write the admin token into this port's token file (this server holds the port, so the file is its own)."""
        path = self.token_path
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.token)
        os.replace(tmp, path)  # a reader sees the old token or the new one, never a partial file
        self._token_saved = True

    def _remove_token(self) -> None:
        """Remove this port's token file if it still holds this server's token."""
        if not self._token_saved:
            return
        self._token_saved = False
        path = self.token_path
        with contextlib.suppress(OSError):
            if path.read_text().strip() == self.token:
                path.unlink()

    def run(self) -> None:
        """Serve until interrupted."""
        try:
            self.save_token()
            self._make().run(sockets=[self._socket])
        finally:
            self.close()

    def close(self) -> None:
        """Release the port and this server's token file; end the cluster's worker actors (cluster mode)."""
        self._remove_token()
        self._socket.close()
        if self.cluster is not None:
            self.cluster.close()

    @contextlib.contextmanager
    def running(self, timeout: float = 300.0) -> Iterator[Server]:
        """Serve on a background thread inside the block (startup deploys included)."""
        server = self._make()
        thread = threading.Thread(target=server.run, kwargs={"sockets": [self._socket]}, name="uvicorn",
                                  daemon=True)
        try:
            self.save_token()
            thread.start()
            deadline = time.monotonic() + timeout
            while not server.started:
                if not thread.is_alive() or time.monotonic() > deadline:
                    raise RuntimeError("the server did not start")
                time.sleep(0.01)
            yield self
        finally:
            server.should_exit = True
            if thread.is_alive():
                thread.join(30)
            self.close()
