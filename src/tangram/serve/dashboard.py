"""The dashboard: `GET /dashboard` (a static page, no auth) and `GET /admin/pool-map` (its data, admin token).

The page polls `/admin/pool-map` once a second with the admin token it took
from the URL fragment (`#token=...`, never sent to the server) or its login
field, kept in the tab's session storage. The pool map is one typed JSON
document (`PoolMap`, shared by `tangram status --json`): per device the arena
merged per model and state (`tangram.pool.poolmap`), per deployment its
instances, queue, requests/s and TTFT quantiles by start type, the last starts
with their stages, and the event log. Each worker's map is built on a small
thread pool of its own (a pool's lock, or a Ray round trip), never on the
event loop, and never behind the controller's long-running starts.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from fastapi import Depends, FastAPI
from fastapi.responses import FileResponse, Response
from pydantic import TypeAdapter

from tangram.control import Controller
from tangram.control.events import Event, StartRecord, TTFTStats, eviction_event
from tangram.serve.errors import APIError
from tangram.worker import DeviceMap

STATIC = Path(__file__).parent / "static"
# the page loads only its own files: no CDN, no inline script, works offline
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}


@dataclass(frozen=True)
class DeploymentView:
    """One deployment as the dashboard shows it."""

    name: str
    instances: int
    starting: int
    queued: int
    inflight: int
    max_instances: int
    keep_alive_s: float
    requests_per_s: float  # arrivals over the last 10 s
    ttft: dict[str, TTFTStats]  # per start type (warm, pool-hit, dram, cold) with recent requests
    last_error: str | None


@dataclass(frozen=True)
class PoolMap:
    """The response of `GET /admin/pool-map` (documented in docs/serving.md)."""

    time: float  # Unix time of this map
    devices: list[DeviceMap]
    deployments: list[DeploymentView]
    starts: list[StartRecord]  # the last starts, oldest first
    events: list[Event]  # controller events and pool evictions, oldest first


POOL_MAP = TypeAdapter(PoolMap)


def deployment_views(controller: Controller) -> list[DeploymentView]:
    """Each deployment's live numbers (event loop: no I/O)."""
    out = []
    for name in controller.names():
        d = controller.describe(name)
        out.append(DeploymentView(name, d["instances"], d["starting"], d["queued"], d["inflight"],
                                  d["max_instances"], d["keep_alive_s"], controller.activity.requests_per_s(name),
                                  controller.activity.ttft(name), d["last_error"]))
    return out


def merged_events(controller_events: list[Event], devices: list[DeviceMap], keep: int = 200) -> list[Event]:
    """The controller's events and every device's evictions in time order, the last `keep`."""
    events = list(controller_events)
    for dev in devices:
        events += [eviction_event(dev.worker, e, i) for i, e in enumerate(dev.evictions)]
    events.sort(key=lambda e: e.at)
    return events[-keep:]


async def build_pool_map(controller: Controller, executor: ThreadPoolExecutor) -> PoolMap:
    """Every worker's map (off the loop, concurrently) and the controller's state."""
    loop = asyncio.get_running_loop()
    devices = list(await asyncio.gather(*(loop.run_in_executor(executor, w.pool_map) for w in controller.workers)))
    return PoolMap(time.time(), devices, deployment_views(controller), controller.activity.starts(),
                   merged_events(controller.activity.events(), devices))


def mount(app: FastAPI, controller: Controller, admin: Callable[..., None]) -> None:
    """Add the dashboard page, its files and the pool-map endpoint (guarded by `admin`) to `app`."""
    executor = ThreadPoolExecutor(max_workers=min(8, len(controller.workers)), thread_name_prefix="pool-map")

    def static(name: str) -> Response:
        path = STATIC / name
        headers = {"Content-Security-Policy": CSP, "Cache-Control": "no-cache", "Referrer-Policy": "no-referrer",
                   "X-Content-Type-Options": "nosniff"}
        return FileResponse(path, media_type=_TYPES[path.suffix], headers=headers)

    @app.get("/dashboard", include_in_schema=False)
    async def dashboard():
        return static("index.html")

    @app.get("/dashboard/{name}", include_in_schema=False)
    async def dashboard_file(name: str):
        if name not in {"app.js", "devices.js", "style.css", "favicon.svg"}:
            raise APIError(404, f"no dashboard file {name!r}")
        return static(name)

    @app.get("/admin/pool-map", dependencies=[Depends(admin)], response_model=None,
             responses={200: {"description": "The pool map (`PoolMap`; docs/serving.md)"}})
    async def pool_map():
        doc = await build_pool_map(controller, executor)
        return Response(POOL_MAP.dump_json(doc), media_type="application/json")
