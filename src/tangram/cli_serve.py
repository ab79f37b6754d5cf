"""`tangram serve` and the admin commands `deploy`, `ls`, `rm`, `status`, `migrate`."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from tangram.cli_common import console
from tangram.cli_common import fail as _fail

URL = typer.Option("--url", help="Server base URL.", envvar="TANGRAM_URL")
TOKEN = typer.Option("--token", help="Admin token (default: $TANGRAM_ADMIN_TOKEN, else the token file that the "
                     "local server on --url's port wrote).")


def ask_over_http(url: str, model: str, prompt: str, api_key: str | None = None) -> None:
    """Stream a chat answer from the server with the openai client; print it and its stage breakdown."""
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key=api_key or "unused", max_retries=0, timeout=600)
    stages = None
    try:
        stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                                temperature=0, max_tokens=64, stream=True)
        console.print(prompt, style="bold", markup=False, highlight=False)
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                console.out(chunk.choices[0].delta.content, end="", highlight=False)
            stages = (chunk.model_extra or {}).get("tangram", {}).get("stages") or stages
    except openai.APIError as exc:
        _fail(f"asking {model!r} failed: {exc}")
    console.out("")
    if stages:
        console.print(f"{stages['start']} start: time to first token {stages['ttft_s']:.3f} s (load "
                      f"{stages['load_s']:.3f} s, {stages['bytes_loaded'] / 1e9:.3f} GB loaded; init "
                      f"{stages['init_s']:.3f} s; prefill {stages['prefill_s']:.3f} s)")


def register(app: typer.Typer) -> None:
    """Add the serving commands to the CLI."""

    @app.command()
    def serve(
        host: Annotated[Optional[str], typer.Option(help="Address to bind (default 127.0.0.1).")] = None,
        port: Annotated[Optional[int], typer.Option(help="Port (default 8000; 0: any free port).", min=0,
                                                    max=65535)] = None,
        api_key: Annotated[Optional[str], typer.Option(
            "--api-key", help="Require this bearer key on every /v1/* request (default: $TANGRAM_API_KEY; "
            "none: the inference API is open).")] = None,
        config: Annotated[Optional[Path], typer.Option("--config", help="Serve config (JSON or TOML).")] = None,
        pool_capacity: Annotated[Optional[str], typer.Option(
            "--pool-capacity", help="Pool per device: bytes with a unit (6GiB, 512MB, 2e9) or a fraction of the "
            "device's memory (0.25 or 25%: of total RAM on the CPU, of free memory on a GPU). Default: "
            "$TANGRAM_POOL_CAPACITY, else min(25% of RAM, 8 GiB) on the CPU, 80% of free memory on a GPU.")] = None,
        ask: Annotated[Optional[str], typer.Option(help="Once up, ask the first deployment this over HTTP.")] = None,
        once: Annotated[bool, typer.Option("--once", help="With --ask: stop after the answer.")] = False,
        ray: Annotated[bool, typer.Option(
            "--ray", help="Cluster mode: worker actors on the Ray cluster at ADDRESS (none: a local Ray).")] = False,
        address: Annotated[Optional[str], typer.Argument(
            metavar="[ADDRESS]", help="With --ray: the Ray cluster's address (e.g. 10.0.0.1:6379 or auto).")] = None,
    ) -> None:
        """Serve the OpenAI-compatible API (the demo model when no deployment is configured)."""
        from pydantic import ValidationError

        from tangram.control import ServeConfig
        from tangram.serve import Server

        try:
            cfg = ServeConfig.from_file(config) if config else ServeConfig()
            if pool_capacity is not None:
                from tangram.pool.capacity import parse_capacity

                cfg = cfg.model_copy(update={"pool_capacity": parse_capacity(pool_capacity)})  # parsed: valid
            updates = {k: v for k, v in (("host", host), ("port", port), ("api_key", api_key)) if v is not None}
            cfg = ServeConfig.model_validate({**cfg.model_dump(), **updates})  # model_copy would not validate
            if address is not None and not ray:
                raise ValueError(f"{address!r}: a Ray address goes after --ray")
            server = Server(cfg, ray_address=(address or "") if ray else None)
        except (OSError, ValueError, ValidationError, ImportError) as exc:
            _fail(exc)
        if server.generated_token:
            console.print(f"admin token (also in {escape(str(server.token_path))}): [bold]{escape(server.token)}[/]")
        names = ", ".join(d.name for d in cfg.deployments) or "demo"
        key_note = ", API key required" if server.api_key else ""
        console.print(f"serving {names} at {server.url}/v1 (OpenAI-compatible{key_note}); Ctrl-C stops",
                      markup=False, highlight=False)
        for line in server.pool_lines:
            console.print(line, markup=False, highlight=False)
        # the token goes in the fragment, which the browser never sends to the server
        fragment = f"#token={server.token}" if server.generated_token else " (log in with the admin token)"
        console.print(f"dashboard: {server.url}/dashboard{fragment}", markup=False, highlight=False)
        if not ask:
            server.run()
            return
        with server.running():  # stops the cluster's worker actors at exit
            ask_over_http(server.url, names.split(", ")[0], ask, api_key=server.api_key)
            if once:
                return
            try:
                threading.Event().wait()
            except KeyboardInterrupt:
                pass

    @app.command()
    def deploy(
        name: Annotated[str, typer.Argument(help="Deployment (model) name clients use.")],
        checkpoint: Annotated[Optional[str], typer.Option(
            "--checkpoint", help="`demo`, a checkpoint or a HF directory.")] = None,
        adapter: Annotated[Optional[str], typer.Option(
            "--adapter", help="A LoRA adapter (PEFT directory) to serve on the deployment --base.")] = None,
        base: Annotated[Optional[str], typer.Option("--base", help="The base deployment of --adapter.")] = None,
        keep_alive: Annotated[float, typer.Option("--keep-alive", help="Idle seconds before scale to zero.")] = 60.0,
        max_instances: Annotated[int, typer.Option(
            "--max-instances", help="Most instances it scales out to (1-64).")] = 1,
        min_instances: Annotated[int, typer.Option(
            "--min-instances", help="Instances kept running even when idle (0 = scale to zero).")] = 0,
        target_concurrency: Annotated[int, typer.Option(
            "--target-concurrency", help="Requests per instance before it scales out.")] = 8,
        dtype: Annotated[str, typer.Option(
            "--dtype", help="Compute dtype: auto, float32, bfloat16 or float16 (auto: the checkpoint's on CUDA; on a "
            "CPU a 16-bit checkpoint runs in the CPU's fastest dtype). Another than the checkpoint's runs a copy, "
            "made once at deploy.")] = "auto",
        backend: Annotated[str, typer.Option(
            "--backend", help="Engine backend: builtin (Tangram's engine) or vllm (vLLM engine processes bound to "
            "the pool; docs/vllm.md).")] = "builtin",
        max_loras: Annotated[int, typer.Option(
            "--max-loras", help="vllm backend: LoRA adapters one step serves at once (vLLM's --max-loras); 0: its "
            "engine runs without LoRA and serves no adapter.")] = 0,
        max_lora_rank: Annotated[int, typer.Option(
            "--max-lora-rank", help="vllm backend: the largest adapter rank it serves (vLLM's --max-lora-rank).")] = 16,
        url: Annotated[str, URL] = "http://127.0.0.1:8000",
        token: Annotated[Optional[str], TOKEN] = None,
    ) -> None:
        """Create or update a deployment on a running server."""
        from tangram.serve.client import AdminClient, AdminError

        if (checkpoint is None) == (adapter is None) or (adapter is None) != (base is None):
            _fail("give --checkpoint, or --adapter with --base")
        if adapter is not None:
            spec = {"name": name, "adapter": str(Path(adapter).resolve()), "base": base}
        else:
            path = Path(checkpoint)
            spec = {"name": name, "checkpoint": str(path.resolve()) if path.exists() else checkpoint,
                    "keep_alive_s": keep_alive, "max_instances": max_instances, "min_instances": min_instances,
                    "target_concurrency": target_concurrency, "backend": backend,
                    "engine": {"dtype": dtype, "max_loras": max_loras, "max_lora_rank": max_lora_rank}}
        try:
            d = AdminClient(url, token).deploy(spec)
        except AdminError as exc:
            _fail(exc)
        console.print(f"deployed {d['name']} ({d['bytes'] / 1e9:.3f} GB) from {d['resolved_checkpoint']}")

    @app.command("ls")
    def ls(url: Annotated[str, URL] = "http://127.0.0.1:8000", token: Annotated[Optional[str], TOKEN] = None) -> None:
        """List deployments."""
        from tangram.serve.client import AdminClient, AdminError

        try:
            rows = AdminClient(url, token).list()
        except AdminError as exc:
            _fail(exc)
        table = Table("name", "checkpoint", "GB", "instances", "inflight", "queued", "keep-alive s", "max")
        for d in rows:
            source = d["checkpoint"] or f"{d['adapter']} (adapter of {d['base']})"
            table.add_row(d["name"], source, f"{d['bytes'] / 1e9:.3f}", str(d["instances"]),
                          str(d["inflight"]), str(d["queued"]), f"{d['keep_alive_s']:g}", str(d["max_instances"]))
        console.print(table)

    @app.command("rm")
    def rm(name: Annotated[str, typer.Argument(help="Deployment to remove.")],
           url: Annotated[str, URL] = "http://127.0.0.1:8000",
           token: Annotated[Optional[str], TOKEN] = None) -> None:
        """Remove a deployment (its instances stop; its tensors stay retained in the pool)."""
        from tangram.serve.client import AdminClient, AdminError

        try:
            AdminClient(url, token).remove(name)
        except AdminError as exc:
            _fail(exc)
        console.print(f"removed {name}")

    @app.command()
    def migrate(name: Annotated[str, typer.Argument(help="Deployment whose running requests move.")],
                to: Annotated[str, typer.Option("--to", help="Destination worker, as `tangram status` names it "
                                                "(cpu#1, cuda:0#0@node1); an instance starts there if none runs.")],
                url: Annotated[str, URL] = "http://127.0.0.1:8000",
                token: Annotated[Optional[str], TOKEN] = None) -> None:
        """Live-migrate a deployment's running requests to another device (token-based: docs/migration.md)."""
        from tangram.serve.client import AdminClient, AdminError

        try:
            report = AdminClient(url, token).migrate(name, to)
        except AdminError as exc:
            _fail(exc)
        console.print(f"moved {report['moved']} of {len(report['moves'])} running request(s) of {name} to "
                      f"{report['instance']} on {to}", markup=False, highlight=False)
        for m in report["moves"]:
            note = f" ({m['error']})" if m["error"] else ""
            console.print(f"  {m['request_id']}: {m['outcome']} after {m['rounds']} round(s), {m['bytes_sent']} "
                          f"bytes, {m['seconds'] * 1e3:.0f} ms{note}", markup=False, highlight=False)

    @app.command()
    def status(url: Annotated[str, URL] = "http://127.0.0.1:8000",
               token: Annotated[Optional[str], TOKEN] = None,
               as_json: Annotated[bool, typer.Option("--json", help="Print the dashboard's pool map (GET "
                                                     "/admin/pool-map, docs/serving.md) as JSON.")] = False) -> None:
        """Per device: pool bytes active/retained/free, KV bytes, instances; per deployment: queue."""
        import json

        from tangram.serve.client import AdminClient, AdminError

        try:
            client = AdminClient(url, token)
            if as_json:
                typer.echo(json.dumps(client.pool_map(), indent=2))  # plain stdout: for jq and scripts
                return
            st = client.status()
        except AdminError as exc:
            _fail(exc)
        table = Table("worker", "active GB", "retained GB", "free GB", "KV GB", "instances", title="devices")
        for w in st["workers"]:
            p = w["pool"]
            inst = ", ".join(f"{i['deployment']}({i['inflight']})" for i in w["instances"]) or "-"
            table.add_row(w["worker"], f"{p['active'] / 1e9:.3f}", f"{p['retained'] / 1e9:.3f}",
                          f"{p['free'] / 1e9:.3f}", f"{w['kv_bytes'] / 1e9:.3f}", inst)
        console.print(table)
        dep = Table("deployment", "instances", "starting", "inflight", "queued", "last error", title="deployments")
        for name, d in st["deployments"].items():
            dep.add_row(name, str(d["instances"]), str(d["starting"]), str(d["inflight"]), str(d["queued"]),
                        d["last_error"] or "-")
        console.print(dep)

