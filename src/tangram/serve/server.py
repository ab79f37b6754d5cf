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
import threading
import time
from collections.abc import Iterator

import uvicorn
from fastapi import FastAPI

from tangram.control import Controller, Deployment, ServeConfig
from tangram.paths import data_dir
from tangram.scheduler.adapter import shared_estimator
from tangram.serve.app import create_app
from tangram.store import HostCache, Loader
from tangram.worker import Worker, local_devices

log = logging.getLogger(__name__)

DEMO = Deployment(name="demo", checkpoint="demo", keep_alive_s=300)


def token_file():
    """Where the admin token of the local server is kept for the CLI (mode 0600)."""
    return data_dir() / "admin-token"


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
    if not token and not is_loopback(config.host):
        raise ValueError(f"refusing to listen on {config.host} without an admin token: set admin_token in the "
                         "config or TANGRAM_ADMIN_TOKEN")
    if token:
        return token, False
    return secrets.token_urlsafe(24), True


def build_workers(config: ServeConfig) -> list[Worker]:
    """One worker per local device, sharing one host DRAM cache tier."""
    devices = local_devices(config.cpu_devices)
    cache = HostCache(config.host_cache_bytes) if config.host_cache_bytes else None
    loader = Loader(cache=cache)
    cap = config.pool_capacity
    if cap <= 1 and devices[0] == "cpu":
        cap = cap / len(devices)  # logical CPU devices share one memory
    capacity: int | float = cap if cap <= 1 else int(cap)
    return [Worker(i, d, capacity, loader) for i, d in enumerate(devices)]


class Server:
    """A configured server; `run()` blocks, `running()` serves from a thread (tests, benchmarks)."""

    def __init__(self, config: ServeConfig | None = None, ray_address: str | None = None) -> None:
        """`ray_address`: None for the embedded deployment; a Ray address, or "" for a local Ray, for cluster mode."""
        self.config = config or ServeConfig()
        self.token, self.generated_token = resolve_token(self.config)
        self.cluster = None
        if ray_address is None:
            self.workers = build_workers(self.config)
        else:
            from tangram.cluster import RayCluster

            self.cluster = RayCluster.connect(self.config, ray_address)
            self.workers = self.cluster.workers
        shared_estimator()  # tier bandwidths for placement, measured (or read from the probe) before serving
        self.controller = Controller(self.workers, self.config.scheduler)
        self.app: FastAPI = create_app(self.controller, admin_token=self.token)
        self.app.router.lifespan_context = self._lifespan
        self._uvicorn: uvicorn.Server | None = None

    @contextlib.asynccontextmanager
    async def _lifespan(self, _app: FastAPI):
        for spec in self.config.deployments or [DEMO]:
            try:
                await self.controller.deploy(spec)
            except Exception:  # noqa: BLE001 - one bad deployment must not keep the others down
                log.exception("deployment %s failed; serving the others", spec.name)
        yield
        await self.controller.shutdown()

    @property
    def url(self) -> str:
        """Base URL (with the bound port once started)."""
        port = self.config.port
        if self._uvicorn is not None and self._uvicorn.servers:
            port = self._uvicorn.servers[0].sockets[0].getsockname()[1]
        return f"http://{self.config.host}:{port}"

    def _make(self) -> uvicorn.Server:
        cfg = uvicorn.Config(self.app, host=self.config.host, port=self.config.port, log_level="warning",
                             lifespan="on", timeout_graceful_shutdown=5)
        self._uvicorn = uvicorn.Server(cfg)
        return self._uvicorn

    def save_token(self) -> None:
        """Write the admin token where the local CLI finds it."""
        path = token_file()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.token)

    def run(self) -> None:
        """Serve until interrupted."""
        self.save_token()
        try:
            self._make().run()
        finally:
            self.close()

    def close(self) -> None:
        """End the cluster's worker actors (cluster mode; nothing to do embedded)."""
        if self.cluster is not None:
            self.cluster.close()

    @contextlib.contextmanager
    def running(self, timeout: float = 300.0) -> Iterator[Server]:
        """Serve on a background thread inside the block (startup deploys included)."""
        server = self._make()
        thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
        thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        try:
            yield self
        finally:
            server.should_exit = True
            thread.join(30)
            self.close()
