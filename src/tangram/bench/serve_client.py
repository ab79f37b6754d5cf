"""The client of bench serve, run as a separate process: concurrent streaming chats through the OpenAI API.

    python -m tangram.bench.serve_client SPEC.json OUT.json

SPEC holds the server's `url`, the `model` name, the `prompt` pattern (with
`{i}`), `warmup_tokens` and `runs` (each `{"n": concurrent requests,
"max_tokens": ...}`), played in order after one untimed warm-up chat (none when
`warmup_tokens` is 0). Every request is a distinct prompt (one counter over the
whole spec, from `first_prompt`, 0 by default: a server played by several
clients in turn gets each its own range). Each request
streams with `ignore_eos` and temperature 0 and asks for the usage chunk; per
request the client records TTFT (request sent -> first content token), the
completion tokens the usage chunk reports, the content chunks it counted, the
finish reason and any error. A run's wall time is its first send to its last
stream's end. Using the official `openai` client (httpx underneath, no retries)
measures what an ordinary OpenAI user sees.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import httpx

PROMPT = "Write a short story about robot number {i}."


@dataclass
class RequestRecord:
    """What one streamed chat request gave."""

    max_tokens: int
    ttft_s: float | None = None
    total_s: float | None = None
    completion_tokens: int | None = None  # from the usage chunk; None when none came
    chunks: int = 0  # chunks with non-empty content
    finish_reason: str | None = None
    error: str | None = None


async def one_chat(client: Any, model: str, prompt: str, max_tokens: int,
                   response_format: dict[str, Any] | None = None) -> RequestRecord:
    """Stream one chat answer of exactly `max_tokens` tokens (ignore_eos; `response_format`: under it); never
    raises (errors are recorded)."""
    rec = RequestRecord(max_tokens=max_tokens)
    t0 = time.perf_counter()
    try:
        stream = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0,
            stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
            **({"response_format": response_format} if response_format else {}))
        async for chunk in stream:
            if chunk.usage is not None:
                rec.completion_tokens = chunk.usage.completion_tokens
            for choice in chunk.choices:
                if choice.delta is not None and choice.delta.content:
                    if rec.ttft_s is None:
                        rec.ttft_s = time.perf_counter() - t0
                    rec.chunks += 1
                if choice.finish_reason is not None:
                    rec.finish_reason = choice.finish_reason
    except Exception as exc:  # noqa: BLE001 - any failure of one request is counted, never ends the run
        rec.error = f"{type(exc).__name__}: {exc}"[:300]
    rec.total_s = time.perf_counter() - t0
    return rec


async def concurrent_run(client: Any, model: str, prompts: list[str], max_tokens: int,
                         response_format: dict[str, Any] | None = None) -> dict[str, Any]:
    """All `prompts` at once; the run's wall time and every request's record."""
    t0 = time.perf_counter()
    records = await asyncio.gather(*(one_chat(client, model, p, max_tokens, response_format) for p in prompts))
    wall = time.perf_counter() - t0
    return {"n": len(prompts), "max_tokens": max_tokens, "wall_s": wall, "requests": [asdict(r) for r in records]}


def make_client(url: str, connections: int, api_key: str | None = None) -> Any:
    """An AsyncOpenAI client on `url` whose connection pool holds `connections` concurrent streams, no retries."""
    import openai

    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    http = httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(900.0, connect=60.0))
    return openai.AsyncOpenAI(base_url=url.rstrip("/") + "/v1", api_key=api_key or "unused", max_retries=0,
                              http_client=http)


async def play(spec: dict[str, Any]) -> dict[str, Any]:
    """The warm-up chat, then every run of `spec` in order."""
    pattern = spec.get("prompt", PROMPT)
    runs = spec["runs"]
    connections = max([1000, *(r["n"] for r in runs)])  # never the client's limit
    client = make_client(spec["url"], connections, spec.get("api_key"))
    counter = int(spec.get("first_prompt", 0))

    def prompts(n: int) -> list[str]:
        nonlocal counter
        out = [pattern.format(i=counter + k) for k in range(n)]
        counter += n
        return out

    async with client:
        tokens = spec.get("warmup_tokens", 8)
        warm = await one_chat(client, spec["model"], prompts(1)[0], tokens) if tokens else None
        results = [await concurrent_run(client, spec["model"], prompts(r["n"]), r["max_tokens"],
                                        r.get("response_format")) for r in runs]
    return {"warmup": asdict(warm) if warm is not None else None, "runs": results}


def main(argv: list[str]) -> int:
    """Entry point: SPEC.json OUT.json."""
    if len(argv) != 2:
        sys.stderr.write("usage: python -m tangram.bench.serve_client SPEC.json OUT.json\n")
        return 2
    with open(argv[0]) as f:
        spec = json.load(f)
    result = asyncio.run(play(spec))
    with open(argv[1], "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
