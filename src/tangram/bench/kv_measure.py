"""`tangram bench kv` beside the trace replay: warm-up, throughput at equal batch, concurrency, the tables.

Throughput: one model, one batch of B equal-length prompts, exactly N new
tokens (greedy, fp32, EOS ignored), run by an elastic engine, a reserve engine
(both instances on one pool, so they share the very same weight bytes) and
plain transformers `model.generate` on the same weights from the Hugging Face
directory; repeats interleaved in a rotating order; tokens/s = B x N over the
wall time of one batch (prefill included), median over repeats; ratios are
medians of the per-repeat ratios (paired runs, so slow drift cancels). The
engine's decode-only rate (its `decode_s`, which excludes block allocation) is
reported alongside.

Concurrency: a fresh pool of the replay's capacity holding one model; sequences
of a fixed prompt + max_tokens length (a whole number of KV blocks, all taken at
admission, so no sequence grows or is preempted) are submitted in excess, and
the peak of `len(engine.running)` is recorded. Reserve mode runs with the
largest max_batch whose reservation (max_batch x the model's context) fits
beside the weights; elastic mode with max_batch 4096, limited only by the
pool's free bytes.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from rich.console import Console

from tangram.bench.common import Column, StepProgress, fmt_bytes, fmt_num, median, print_summary, print_table
from tangram.bench.kv_workload import ModelPaths, Setup, aligned, kv_block_bytes
from tangram.engine import EngineConfig, Instance, SamplingParams
from tangram.pool import DevicePool
from tangram.workload import ModelSpec

log = logging.getLogger(__name__)

MODES = ("elastic", "reserve")
ENGINES = ("elastic", "reserve", "transformers")


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run with `n` intra-op threads (None: leave as is), restored after.

    On a small shared machine, a second busy process makes a 2-thread torch spin at
    its barriers: a batch that takes 0.3 s on one thread took 10 s on two.
    """
    prev = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def warm_up(models: list[ModelSpec], paths: dict[str, ModelPaths], setup: Setup, block_tokens: int) -> None:
    """Start each architecture once and generate a few tokens (first-forward costs are paid here, untimed)."""
    seen: set[str] = set()
    for m in models:
        if m.architecture in seen:
            continue
        seen.add(m.architecture)
        pool = DevicePool(sum(setup.keys[m.name].values()) + 64 * kv_block_bytes(m, block_tokens), "cpu")
        with Instance(paths[m.name].ckpt, pool, EngineConfig(block_tokens=block_tokens, max_batch=2),
                      name=f"warm-{m.name}") as inst:
            inst.engine.generate([[3, 4, 5, 6, 7], [8, 9]], SamplingParams(max_tokens=4, ignore_eos=True))


def _hf_model(paths: ModelPaths):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(paths.hf, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def measure_throughput(m: ModelSpec, paths: ModelPaths, setup: Setup, *, batch: int, prompt: int, new_tokens: int,
                       repeats: int, seed: int, block_tokens: int,
                       bar: StepProgress) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows (one per engine) and facts (model, outputs equal) of the equal-batch throughput measurement."""
    rng = random.Random(seed * 31 + 5)
    prompts = [[rng.randrange(3, m.vocab) for _ in range(prompt)] for _ in range(batch)]
    block = kv_block_bytes(m, block_tokens)
    reserve = math.ceil(batch * m.context / block_tokens) * block
    elastic = 2 * math.ceil(batch * (prompt + new_tokens) / block_tokens + batch) * block
    pool = DevicePool(aligned(sum(setup.keys[m.name].values()) + reserve + elastic + (1 << 20)), "cpu")
    insts = {mode: Instance(paths.ckpt, pool, EngineConfig(kv_mode=mode, block_tokens=block_tokens, max_batch=batch),
                            name=f"tp-{mode}") for mode in MODES}
    hf = _hf_model(paths)
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)

    def run(kind: str) -> tuple[float, list[list[int]]]:
        if kind == "transformers":
            ids = torch.tensor(prompts)
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, do_sample=False)
            dt = time.perf_counter() - t0
            return dt, out[:, prompt:].tolist()
        t0 = time.perf_counter()
        outs = insts[kind].engine.generate(prompts, params)
        dt = time.perf_counter() - t0
        if any(o.completion_tokens != new_tokens or o.finish_reason != "length" for o in outs):
            raise RuntimeError(f"{kind} engine did not generate {new_tokens} tokens for every prompt: "
                               f"{[(o.completion_tokens, o.finish_reason, o.error) for o in outs]}")
        return dt, [list(o.output_ids or []) for o in outs]

    try:
        bar.describe("throughput warm-up")
        for kind in ENGINES:
            run(kind)
        before = {k: insts[k].engine.totals.model_copy() for k in MODES}
        times: dict[str, list[float]] = {k: [] for k in ENGINES}
        outputs: dict[str, list[list[int]]] = {}
        for rep in range(repeats):
            bar.describe(f"throughput {rep + 1}/{repeats}: elastic, reserve, transformers interleaved")
            k = rep % len(ENGINES)
            for kind in ENGINES[k:] + ENGINES[:k]:
                dt, outputs[kind] = run(kind)
                times[kind].append(dt)
            bar.advance()
        rows = []
        for kind in ENGINES:
            tps = [batch * new_tokens / dt for dt in times[kind]]
            row: dict[str, Any] = {"section": "throughput", "engine": kind, "batch": batch, "prompt_tokens": prompt,
                                   "new_tokens": new_tokens, "tokens_per_second": median(tps),
                                   "tokens_per_second_runs": [round(x, 2) for x in tps],
                                   "seconds_median": median(times[kind])}
            if kind in MODES:
                tot, b = insts[kind].engine.totals, before[kind]
                decoded = tot.generated_tokens - b.generated_tokens - repeats * batch  # first tokens: prefill
                spent = tot.decode_s - b.decode_s
                row["decode_tokens_per_second"] = decoded / spent if spent > 0 else None
            rows.append(row)
        paired = {other: [t_o / t_e for t_e, t_o in zip(times["elastic"], times[other])] for other in ENGINES[1:]}
        info = {"model": m.name, "outputs_equal_elastic_reserve": outputs["elastic"] == outputs["reserve"],
                "elastic_over_reserve": median(paired["reserve"]),
                "elastic_over_transformers": median(paired["transformers"]),
                "elastic_over_reserve_runs": [round(x, 4) for x in paired["reserve"]],
                "outputs_match_transformers": outputs["elastic"] == outputs["transformers"],
                "measure": "B x N generated tokens over the wall time of one batch (prefill included); "
                           "median over interleaved repeats; ratios: median over repeats of the per-repeat ratio; "
                           "decode_tokens_per_second: engine decode steps only (no block allocation)"}
        return rows, info
    finally:
        for inst in insts.values():
            inst.close()


def measure_concurrency(m: ModelSpec, paths: ModelPaths, setup: Setup, *, prompt: int, new_tokens: int,
                        block_tokens: int, bar: StepProgress) -> list[dict[str, Any]]:
    """Rows (one per mode): the peak number of sequences of prompt + new_tokens tokens running at once."""
    seq = prompt + new_tokens
    if seq % block_tokens or math.ceil(prompt / block_tokens) != seq // block_tokens:
        raise ValueError("prompt + new_tokens must fill whole KV blocks, all of them taken by the prompt")
    block = kv_block_bytes(m, block_tokens)
    room = setup.capacity - sum(setup.keys[m.name].values())
    rng = random.Random(1234)
    ids = [rng.randrange(3, m.vocab) for _ in range(prompt)]
    rows = []
    for mode in MODES:
        bar.describe(f"concurrency: {mode}")
        t0 = time.perf_counter()
        if mode == "reserve":
            max_batch = room // (math.ceil(m.context / block_tokens) * block)
            bound = max_batch
        else:
            max_batch, bound = 4096, room // (seq // block_tokens * block)
        row: dict[str, Any] = {"section": "concurrency", "mode": mode, "max_batch": max_batch, "seq_tokens": seq,
                               "bound": bound, "peak_running": 0, "kv_peak_bytes": 0}
        if max_batch >= 1:
            pool = DevicePool(setup.capacity, "cpu")
            cfg = EngineConfig(kv_mode=mode, block_tokens=block_tokens, max_batch=max_batch)
            with Instance(paths.ckpt, pool, cfg, name=f"conc-{mode}") as inst:
                eng = inst.engine
                submitted = min(4096, bound + max(8, bound // 4))
                for _ in range(submitted):
                    eng.add_request(ids, SamplingParams(max_tokens=new_tokens, ignore_eos=True))
                peak = flat = 0
                while eng.has_work() and flat < 2:
                    eng.step()
                    peak, flat = (len(eng.running), 0) if len(eng.running) > peak else (peak, flat + 1)
                    if not eng.waiting:
                        break  # everything admitted: the bound was not reached
                row.update(peak_running=peak, submitted=submitted, kv_waits=eng.totals.kv_waits,
                           kv_peak_bytes=inst.kv.peak * inst.kv.spec.block_bytes)
        row["seconds"] = round(time.perf_counter() - t0, 3)
        rows.append(row)
        bar.advance()
    return rows


_C, _N, _B = Column, fmt_num, fmt_bytes
START_COLUMNS = [
    _C("mode", "mode", justify="left"), _C("starts", "starts"), _C("starts_cold", "cold"),
    _C("starts_partial", "partial"), _C("starts_pool_hit", "pool-hit"), _C("start_waits", "waits"),
    _C("load_seconds", "load s", _N(3)), _C("bytes_loaded", "loaded", _B),
]
MEMORY_COLUMNS = [
    _C("mode", "mode", justify="left"), _C("retained_mean", "retained mean", _B), _C("kv_mean", "KV mean", _B),
    _C("active_mean", "active mean", _B), _C("ttft_p50", "TTFT p50 s", _N(3)), _C("ttft_p95", "TTFT p95 s", _N(3)),
    _C("failed", "failed"),
]
TP_COLUMNS = [
    _C("engine", "engine", justify="left"), _C("batch", "batch"), _C("new_tokens", "new tokens"),
    _C("tokens_per_second", "tok/s", _N(1)), _C("decode_tokens_per_second", "decode tok/s", _N(1)),
    _C("seconds_median", "s / batch", _N(3)),
]
CONC_COLUMNS = [
    _C("mode", "mode", justify="left"), _C("max_batch", "max_batch"), _C("seq_tokens", "seq tokens"),
    _C("bound", "expected"), _C("peak_running", "peak running"), _C("kv_peak_bytes", "KV peak", _B),
]


def print_report(console: Console, head: str, rows: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    """The run's tables (replay starts, replay memory and latency, throughput, concurrency) and its summary."""
    by = {s: [r for r in rows if r["section"] == s] for s in ("replay", "throughput", "concurrency")}
    print_table(console, f"{head}\ntrace replay: instance starts", START_COLUMNS, by["replay"])
    print_table(console, "trace replay: pool memory (time means) and TTFT", MEMORY_COLUMNS, by["replay"])
    print_table(console, "throughput at equal batch (median of interleaved repeats)", TP_COLUMNS, by["throughput"])
    print_table(console, "sequences running at once on the replay's pool capacity", CONC_COLUMNS, by["concurrency"])
    print_summary(console, "summary", summary)
