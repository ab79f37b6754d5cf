"""`tangram run`: one prompt on the embedded engine, streamed, with the stage breakdown."""

from __future__ import annotations

import time
from collections.abc import Callable

from rich.console import Console
from rich.table import Table

from tangram.cli_common import auto_device


def run_prompt(model: str, prompt: str, *, max_tokens: int, temperature: float, top_p: float, top_k: int,
               seed: int | None, chat: bool, device: str, kv_mode: str, pool_gb: float | None, console: Console,
               fail: Callable[[Exception], None], dtype: str = "auto") -> None:
    """Start an instance of `model` (in `dtype`) on a fresh device pool, stream the answer, print where the time
    went."""
    from pydantic import ValidationError

    from tangram.engine import EngineConfig, Instance, RequestError, SamplingParams
    from tangram.engine.errors import EngineError
    from tangram.pool import DevicePool, PoolFullError
    from tangram.resolve import resolve_model
    from tangram.store import Checkpoint, CheckpointError

    dev = auto_device(device)
    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
        config = EngineConfig(kv_mode=kv_mode, max_batch=1, dtype=dtype)
        with console.status(f"locating {model}"):  # and its copy in the compute dtype (made once)
            path = resolve_model(model, show_progress=True, dtype=config.dtype, device=dev)
        ckpt = Checkpoint(path)
        capacity = int(pool_gb * 1e9) if pool_gb else max(int(ckpt.index.total_bytes * 1.5), 256 << 20)
        pool = DevicePool(capacity, dev)
        arrival = time.perf_counter()  # the request arrives; the instance starts for it
        with console.status(f"starting {path.name} on {dev}"):
            inst = Instance(ckpt, pool, config, arrival=arrival)
    except (CheckpointError, OSError, ValueError, ValidationError, PoolFullError, EngineError) as exc:
        fail(exc)
        return
    final = None
    try:
        def show(out) -> None:
            nonlocal final
            console.out(out.delta, end="", highlight=False)
            if out.finished:
                final = out

        inst.engine.add_request(prompt, params, sink=show, arrival=arrival, chat=chat)
        inst.engine.run_until_idle()
        console.out("")
    except RequestError as exc:
        fail(exc)
    finally:
        inst.close()
    if final is not None:
        console.print(stage_table(final, inst.engine.totals))


def stage_table(final, totals) -> Table:
    """The stage breakdown of one finished request as a table."""
    st = final.stages
    table = Table(title=f"stage breakdown ({st.start} start, finish: {final.finish_reason})")
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    table.add_column("detail")
    gb = 1e9
    table.add_row("queue", f"{st.queue_s:.3f}", "")
    table.add_row("init", f"{st.init_s:.3f}", "model skeleton (meta device) + tokenizer")
    table.add_row("load", f"{st.load_s:.3f}",
                  f"{st.bytes_loaded / gb:.3f} GB loaded, {st.bytes_reused / gb:.3f} GB reused from the pool")
    table.add_row("kv", f"{st.kv_s:.4f}", "KV blocks for the prompt")
    table.add_row("prefill", f"{st.prefill_s:.3f}", f"{final.prompt_tokens} prompt tokens")
    table.add_row("[bold]time to first token[/]", f"[bold]{st.ttft_s:.3f}[/]", "")
    rate = (totals.decode_steps / totals.decode_s) if totals.decode_s else 0.0
    table.add_row("decode", f"{totals.decode_s:.3f}", f"{final.completion_tokens} tokens, {rate:.1f} steps/s")
    return table
