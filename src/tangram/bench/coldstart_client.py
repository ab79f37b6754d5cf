"""The client of bench coldstart, run as a separate process: replays a trace against the server's HTTP API.

    python -m tangram.bench.coldstart_client URL TRACE.json OUT.json [--warm N]

Each request is sent at its trace time (streamed completions with prompt token
ids); TTFT is request sent -> first streamed token, measured here. `--warm N`
instead sends, per model of the trace, one untimed and N timed requests back to
back (the warm-instance TTFT that overheads are measured against).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import httpx


async def one(client: httpx.AsyncClient, url: str, req: dict) -> dict:
    """Send one request; return its timings, start type and stages."""
    body = {"model": req["model"], "prompt": req["prompt"], "max_tokens": req["max_tokens"], "temperature": 0,
            "stream": True, "ignore_eos": True}
    out = {"model": req["model"], "t": req.get("t", 0.0), "ttft_s": None, "error": None, "text": ""}
    t0 = time.perf_counter()
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                out["error"] = f"{r.status_code}: {(await r.aread()).decode()[:200]}"
                return out
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if out["ttft_s"] is None:
                    out["ttft_s"] = time.perf_counter() - t0
                out["text"] += chunk["choices"][0]["text"]
                if (chunk.get("tangram") or {}).get("error"):  # it failed after its first token
                    out["error"] = chunk["tangram"]["error"]
                stages = (chunk.get("tangram") or {}).get("stages")
                if stages:
                    out.update(start=stages["start"], load_s=stages["load_s"], init_s=stages["init_s"],
                               schedule_s=stages["schedule_s"],
                               queue_s=stages["queue_s"], kv_s=stages["kv_s"], prefill_s=stages["prefill_s"],
                               server_ttft_s=stages["ttft_s"], bytes_loaded=stages["bytes_loaded"],
                               load_interval=stages["load_interval"], prefill_interval=stages["prefill_interval"])
    except httpx.HTTPError as exc:
        out["error"] = repr(exc)
    out["total_s"] = time.perf_counter() - t0
    return out


async def replay(url: str, trace: list[dict]) -> list[dict]:
    """Every request at its trace time, concurrently."""
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=1000)) as client:
        t0 = time.perf_counter()

        async def at(req: dict) -> dict:
            await asyncio.sleep(max(0.0, t0 + req["t"] - time.perf_counter()))
            return await one(client, url, req)

        return await asyncio.gather(*(at(r) for r in trace))


async def warm(url: str, trace: list[dict], n: int) -> dict[str, list[float]]:
    """Per model: one untimed request, then `n` timed ones on the now-warm instance."""
    firsts = {}
    for r in trace:
        firsts.setdefault(r["model"], r)
    out: dict[str, list[float]] = {}
    async with httpx.AsyncClient(timeout=600) as client:
        for model, req in firsts.items():
            await one(client, url, req)
            out[model] = [(await one(client, url, req))["ttft_s"] for _ in range(n)]
    return out


def main(argv: list[str]) -> int:
    """Entry point."""
    url, trace_path, out_path = argv[:3]
    trace = json.loads(open(trace_path).read())
    if len(argv) > 4 and argv[3] == "--warm":
        result = asyncio.run(warm(url, trace, int(argv[4])))
    else:
        result = asyncio.run(replay(url, trace))
    with open(out_path, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
