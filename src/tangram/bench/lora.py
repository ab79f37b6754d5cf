"""`tangram bench lora`: LoRA adapter loads (cold / dram / pool) against PEFT's `load_adapter`, and a batch mixing
adapters against the same batch on the base alone.

Adapters are made by PEFT itself (`get_peft_model` on a Qwen2-0.5B-shaped base with random weights, LoRA on
every linear module of the decoder layers, contents randomised, `save_pretrained`), so shapes, names and files
are exactly PEFT's; Tangram converts them at "deploy" (`store/adapter.py`). Per adapter and state:

- tangram: `AdapterSet.acquire` (the engine's own bind: pool acquire through the loader, hooks held) on a
  fresh pool each time, timed once its first pages are touched (as in a server's long-lived pool); cold: the
  converted files dropped from the page cache, dram: the loader's host cache holds them, pool: the adapter
  retained in the pool (a re-bind);
- peft: `PeftModel.load_adapter` (safetensors) onto the same base, both `low_cpu_mem_usage` settings, the
  faster one is the peer; cold: `adapter_model.safetensors` dropped from the page cache, dram: in it.

The large adapter of full mode is timed `big_repeats` times per system, which system goes first alternating (a
cold read's speed on the VM depends on what its disk read lately), medians. The timed part runs with the
start-up heap frozen out of the garbage collector, as the server runs (`tangram.heap`), and the garbage of the
previous state collected before each timed load, for both systems. The read-speed probe a server runs in the
background at its start runs first, untimed (`probe_auto.measure_pending`; nothing when this machine's answer is
kept): without it every cold load reads with the default configuration. Tangram's loader hashes every byte it
reads in every round (`reverify`, as a process's first load of an adapter). Every load is checked: each module's A
and B that Tangram bound equal PEFT's loaded ones, bit for bit. The mixed batch runs 16 greedy requests over 4
adapters in one engine, against the same 16 on the base; every output is checked against the same requests run
one adapter per batch. The base computes in the dtype a
deployment of it computes in on this machine (`resolve_model` with dtype "auto", the server's own resolution:
bf16 on a CPU with native bf16 matmul, else an fp32 copy). Where a vLLM interpreter is found, the vllm
backend's adapter loads are timed against plain vLLM's (`bench/lora_vllm.py`).
"""

from __future__ import annotations

import copy
import gc
import logging
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from tangram.bench.lora_vllm import vllm_rows
from tangram.bench.common import Column, fmt_num, print_summary, print_table, ratio, result_doc, write_result
from tangram.engine import EngineConfig, Instance, SamplingParams
from tangram.engine.dtype import SHORT, compute_dtype
from tangram.engine.lora import AdapterSet
from tangram.heap import frozen_heap
from tangram.paths import data_dir
from tangram.pool import DevicePool
from tangram.resolve import resolve_model
from tangram.store import Checkpoint, HostCache, Loader, convert
from tangram.store.adapter import AdapterInfo, convert_adapter
from tangram.store.format import INDEX_FILE
from tangram.store.io import evict_from_page_cache
from tangram.store.probe_auto import measure_pending
from tangram.workload import ModelSpec

log = logging.getLogger(__name__)
REHASH = True  # Tangram's loader hashes every read in every round (Loader(reverify=...))
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOUCH_WAIT_S = 60.0  # at most, for a fresh pool's arena to be written (1.2 GB at 0.55 GB/s: 2.2 s here)
PEFT_DEFAULT = ["q_proj", "v_proj"]  # PEFT's default target_modules for Qwen2 and Llama
QWEN2_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, max_position_embeddings=4096, tie_word_embeddings=True,
                 bos_token_id=1, eos_token_id=2, pad_token_id=0)


@dataclass(frozen=True)
class Sizes:
    """One mode's sizes."""

    mode: str
    adapters: int = 64  # rank-`rank` adapters made (and converted)
    rank: int = 16
    timed: int = 8  # adapters whose loads are timed in each state
    pool_hits: int = 20
    big_rank: int | None = None  # full mode: one adapter of about 1 GB (rank 896 on this base, bf16)
    requests: int = 16
    batch_adapters: int = 4
    prompt_tokens: int = 32
    max_tokens: int = 32
    repeats: int = 2
    big_repeats: int = 5  # the large adapter's loads, both systems, alternating which goes first (medians)


QUICK = Sizes("quick", repeats=5)
FULL = Sizes("full", timed=16, pool_hits=50, big_rank=896, repeats=7)


def base_spec() -> ModelSpec:
    """The base: Qwen2-0.5B's shapes, bf16."""
    return ModelSpec("qwen2-0.5b-lora-base", "Qwen2Config", QWEN2_05B, "bfloat16", seed=7)


def _tokenizer(directory: Path, vocab: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
                            ).save_pretrained(directory)


def make_base(spec: ModelSpec, root: Path) -> tuple[Any, Checkpoint]:
    """The base model (random weights, std 0.02) in memory and as a Tangram checkpoint under `root`."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(spec.seed)
    config = spec.transformers_config()
    config.initializer_range = 0.02
    model = AutoModelForCausalLM.from_config(config, dtype=spec.torch_dtype).eval()
    ckpt = root / "base"
    if not (ckpt / INDEX_FILE).is_file():
        hf = root / "base-hf"
        model.save_pretrained(hf)
        _tokenizer(hf, spec.vocab)
        convert(hf, ckpt, overwrite=True)
    return model, Checkpoint(ckpt)


def make_adapters(model: Any, base: Checkpoint, root: Path, rank: int, count: int, tag: str,
                  targets: list[str] | None = None) -> list[tuple[Path, Path]]:
    """`count` PEFT adapters of `model` (random A and B, saved by PEFT; LoRA on `targets`, default every linear
    module of the decoder layers), each converted: (peft dir, converted)."""
    from peft import LoraConfig, get_peft_model

    out = [(root / f"{tag}-{i}-peft", root / f"{tag}-{i}") for i in range(count)]
    if all((c / INDEX_FILE).is_file() for _, c in out):
        return out
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets or TARGETS, lora_dropout=0.0)
    peft_model = get_peft_model(copy.deepcopy(model), config, autocast_adapter_dtype=False)
    gen = torch.Generator().manual_seed(rank)
    for src, dst in out:
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_A" in name:  # an input-scaled A and a small B: an update that changes the output
                    p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
                elif "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        peft_model.save_pretrained(src)
        convert_adapter(src, dst, base.index, overwrite=True)
    return out


def _files(path: Path) -> list[Path]:
    return [p for p in path.iterdir() if p.suffix in (".bin", ".safetensors", ".json")]


def _check_equal(peft_model: Any, name: str, bound: Any) -> int:
    """Modules whose A and B Tangram bound equal PEFT's adapter `name`, bit for bit (raises otherwise)."""
    inner = peft_model.base_model.model
    n = 0
    for module_name, module in inner.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if lora_a is None or name not in lora_a:
            continue
        pair = bound.modules[module_name]
        if not (torch.equal(lora_a[name].weight, pair.a) and torch.equal(module.lora_B[name].weight, pair.b)):
            raise AssertionError(f"{module_name}: Tangram's bound adapter differs from PEFT's")
        n += 1
    if n != len(bound.modules):
        raise AssertionError(f"PEFT loaded {n} modules, Tangram bound {len(bound.modules)}")
    return n


def _written_pool(capacity: int, loader: Loader) -> DevicePool:
    """A fresh pool whose whole arena is written once before it is timed, as a long-lived server's pool is.

    This VM backs guest memory on first write and takes freed pages back (virtio-balloon free page reporting):
    fresh memory is written at 0.55-1.0 GB/s, memory written before at 18-22 GB/s. A fresh pool per state would
    put that first write inside the timed load (a 985 MB adapter's DRAM-tier hit took 0.74-0.92 s or 0.10-0.14 s
    by whether its pages had been written moments before), where a server's arena was written by its earlier
    loads. MADV_POPULATE_WRITE (the pool's own toucher) leaves the bytes as they are."""
    pool = DevicePool(capacity, "cpu", loader=loader)
    toucher = pool.arena.toucher
    if toucher is not None:
        toucher.touch_all()
        toucher.idle.wait(TOUCH_WAIT_S)
    return pool


def _tangram_states(inst: Instance, conv: Path, loader: Loader, hits: int
                    ) -> tuple[dict[str, float], Any, AdapterSet]:
    """Seconds of a cold, a dram and `hits` pool-hit binds of one adapter; the pool-hit binding and its set."""
    size = Checkpoint(conv).index.total_bytes
    times: dict[str, float] = {}
    for state in ("cold", "dram"):
        if state == "cold":
            for f in _files(conv):
                evict_from_page_cache(f)
        gc.collect()  # the previous state's pool and set are reference cycles: freed now, not inside a timed load
        pool = _written_pool(int(size * 1.25) + (8 << 20), loader)
        adapters = AdapterSet(pool, inst.model, inst.checkpoint, owner="bench")
        t0 = time.perf_counter()
        bound = adapters.acquire(conv)
        times[state] = time.perf_counter() - t0
        stats = bound.binding.wait_loaded()
        if state == "dram" and (stats is None or stats.bytes_from_cache != size):
            raise AssertionError(f"{conv.name}: the dram load read {stats} instead of the host cache")
        if state == "cold" and (stats is None or stats.bytes_from_disk != size):
            raise AssertionError(f"{conv.name}: the cold load read {stats} instead of the files")
        loader.cache.wait_idle()
        if state == "cold":
            adapters.release(bound)
            adapters.close()
    hit = []
    for _ in range(hits):
        adapters.release(bound)
        t0 = time.perf_counter()
        bound = adapters.acquire(conv)
        hit.append(time.perf_counter() - t0)
        if bound.binding.bytes_loaded:
            raise AssertionError("a retained adapter was loaded again")
    times["pool"] = statistics.median(hit)
    return times, bound, adapters


def _peft_states(peft_model: Any, src: Path, name: str) -> dict[str, float]:
    """Seconds of PEFT's load_adapter, cold and dram, with each low_cpu_mem_usage setting (the adapter left
    loaded under `name`)."""
    times: dict[str, float] = {}
    for low in (False, True):
        for state in ("cold", "dram"):
            if state == "cold":
                evict_from_page_cache(src / "adapter_model.safetensors")
            gc.collect()  # a deleted adapter's garbage is freed now, not inside the timed load (as for Tangram)
            t0 = time.perf_counter()
            peft_model.load_adapter(src, adapter_name=name, low_cpu_mem_usage=low, autocast_adapter_dtype=False)
            times[f"{state}{'-lowmem' if low else ''}"] = time.perf_counter() - t0
            if not (low and state == "dram"):
                peft_model.delete_adapter(name)
    return times


def raw_read_s(path: Path) -> float:
    """Seconds to read `path` with plain reads after dropping it from the page cache: the disk's floor."""
    evict_from_page_cache(path)
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as fh:
        while fh.read(16 << 20):
            pass
    return time.perf_counter() - t0


def load_rows(inst: Instance, peft_model: Any, pairs: list[tuple[Path, Path]], sizes: Sizes, label: str,
              repeats: int = 1) -> list[dict]:
    """One row per timed adapter: every state of both systems (medians of `repeats` rounds, the system that goes
    first alternating: a cold read's speed on this VM depends on what the disk's host read lately), and the
    equality check."""
    rows = []
    for i, (src, conv) in enumerate(pairs):
        name = f"{label}-{i}"
        peers: list[dict[str, float]] = []
        ourses: list[dict[str, float]] = []
        for rep in range(repeats):
            last = rep == repeats - 1
            # Empty cache: cold. reverify: every round hashes what it reads, as a process's first load of an
            # adapter does (later rounds of the same file would otherwise skip it: store/verified.py).
            loader = Loader(cache=HostCache(2 * Checkpoint(conv).index.total_bytes + (64 << 20)), reverify=REHASH)
            for system in (("peft", "tangram") if rep % 2 == 0 else ("tangram", "peft")):
                if system == "peft":
                    peers.append(_peft_states(peft_model, src, name))
                    if not last:
                        peft_model.delete_adapter(name)
                    continue
                ours, bound, adapters = _tangram_states(inst, conv, loader, sizes.pool_hits)
                ourses.append(ours)
                if not last:
                    adapters.close()
        peer = {k: statistics.median(p[k] for p in peers) for k in peers[0]}
        ours = {k: statistics.median(o[k] for o in ourses) for k in ourses[0]}
        modules = _check_equal(peft_model, name, bound)
        adapters.close()
        peft_model.delete_adapter(name)
        info = AdapterInfo.of(Checkpoint(conv).index)
        peer_cold = min(peer["cold"], peer["cold-lowmem"])
        rows.append({"adapter": name, "rank": info.r, "bytes": Checkpoint(conv).index.total_bytes,
                     "modules": modules, "equal": True, "tangram_cold_s": ours["cold"], "tangram_dram_s": ours["dram"],
                     "tangram_pool_ms": ours["pool"] * 1e3, "peft_cold_s": peer["cold"],
                     "peft_cold_lowmem_s": peer["cold-lowmem"], "peft_dram_s": peer["dram"],
                     "peft_dram_lowmem_s": peer["dram-lowmem"], "speedup_cold": ratio(peer_cold, ours["cold"]),
                     "raw_read_cold_s": raw_read_s(src / "adapter_model.safetensors"), "repeats": repeats,
                     "tangram_cold_runs_s": [round(o["cold"], 4) for o in ourses],
                     "peft_cold_runs_s": [round(min(p["cold"], p["cold-lowmem"]), 4) for p in peers]})
    return rows


def mixed_batch(inst: Instance, adapters: list[Path], sizes: Sizes) -> dict[str, Any]:
    """Tokens/s of `requests` greedy requests over `batch_adapters` adapters against the same on the base;
    outputs checked against one batch per adapter."""
    gen = torch.Generator().manual_seed(3)
    vocab = inst.model.config.vocab_size
    prompts = [torch.randint(3, vocab, (sizes.prompt_tokens,), generator=gen).tolist() for _ in range(sizes.requests)]
    params = SamplingParams(max_tokens=sizes.max_tokens, ignore_eos=True)
    which = [str(adapters[i % len(adapters)]) for i in range(sizes.requests)]

    def run(names: list[str | None], idx: list[int]) -> tuple[float, list[list[int]]]:
        sinks: list[list] = [[] for _ in idx]
        t0 = time.perf_counter()
        for sink, i, a in zip(sinks, idx, names):
            inst.engine.add_request(prompts[i], params, sink=sink.append, adapter=a)
        inst.engine.run_until_idle()
        return time.perf_counter() - t0, [s[-1].output_ids for s in sinks]

    every = list(range(sizes.requests))
    run([None] * 2, [0, 1])  # warm-up (operators, packed weights, adapter binds)
    run(which[:len(adapters)], every[:len(adapters)])
    base_s, mixed_s = [], []
    for _ in range(sizes.repeats):
        s, base_out = run([None] * sizes.requests, every)
        base_s.append(s)
        s, mixed_out = run(which, every)
        mixed_s.append(s)
    alone: dict[int, list[int]] = {}
    for a in dict.fromkeys(which):
        idx = [i for i in every if which[i] == a]
        alone.update(zip(idx, run([a] * len(idx), idx)[1]))
    tokens = sizes.requests * sizes.max_tokens
    return {"requests": sizes.requests, "adapters": len(adapters), "tokens": tokens,
            "base_tokens_per_s": tokens / min(base_s), "mixed_tokens_per_s": tokens / min(mixed_s),
            "base_s": [round(x, 3) for x in base_s], "mixed_s": [round(x, 3) for x in mixed_s],
            "outputs_equal_one_adapter_per_batch": sum(mixed_out[i] == alone[i] for i in every),
            "first_difference": [next((j for j, (x, y) in enumerate(zip(mixed_out[i], alone[i])) if x != y), None)
                                 for i in every],  # a bf16 near-tie flips a random model's greedy token
            "outputs_differ_from_base": sum(mixed_out[i] != base_out[i] for i in every)}


def run_lora_bench(*, quick: bool, json_path: Path | None, console: Console | None = None,
                   workdir: Path | None = None, spec: ModelSpec | None = None, sizes: Sizes | None = None
                   ) -> dict[str, Any]:
    """Run `bench lora`, print its tables and summary, write the JSON when `json_path` is given, return it."""
    console = console or Console()
    sizes = sizes or (QUICK if quick else FULL)
    spec = spec or base_spec()
    root = workdir or data_dir() / "bench" / "lora" / spec.name
    root.mkdir(parents=True, exist_ok=True)
    console.print(f"bench lora ({sizes.mode}): base {spec.name}, {sizes.adapters} adapters of rank {sizes.rank}")
    model, base = make_base(spec, root)
    pairs = make_adapters(model, base, root, sizes.rank, sizes.adapters, f"r{sizes.rank}")
    big = make_adapters(model, base, root, sizes.big_rank, 1, f"r{sizes.big_rank}") if sizes.big_rank else []
    qv = make_adapters(model, base, root, sizes.rank, sizes.batch_adapters, f"r{sizes.rank}-qv", PEFT_DEFAULT)
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=1, target_modules=["q_proj"]), autocast_adapter_dtype=False)
    served = Checkpoint(resolve_model(base.path, dtype="auto", device="cpu"))  # what a deployment would serve
    # untimed, as a server's background probe would have by the time its adapters load (else: the default)
    probed = [r.config.label for r in measure_pending([served.path, *(c for _, c in pairs[:1] + big)])]
    dtype = compute_dtype(e.torch_dtype for e in served.index.tensors.values())
    capacity = served.index.total_bytes + 8 * Checkpoint(pairs[0][1]).index.total_bytes + (512 << 20)
    # as in a server: no full collection over the start-up objects (torch, PEFT) inside a timed load
    with frozen_heap(), Instance(served.path, DevicePool(capacity, "cpu"),
                                 EngineConfig(templates=False, max_batch=sizes.requests)) as inst:
        console.print(f"loads: {sizes.timed} adapters of rank {sizes.rank}" + (f", one of rank {sizes.big_rank}"
                                                                              if big else ""))
        rows = load_rows(inst, peft_model, pairs[:sizes.timed], sizes, f"r{sizes.rank}")
        rows += load_rows(inst, peft_model, big, sizes, f"r{sizes.big_rank}", repeats=sizes.big_repeats)
        console.print(f"mixed batch: {sizes.requests} requests over {sizes.batch_adapters} adapters, and on the base")
        mixed = mixed_batch(inst, [c for _, c in pairs[:sizes.batch_adapters]], sizes)
        mixed_qv = mixed_batch(inst, [c for _, c in qv], sizes)
    console.print(f"vLLM rows: {sizes.timed} adapters of rank {sizes.rank} on the vllm backend and on plain vLLM")
    try:
        vllm = vllm_rows(base, root / "base-hf", pairs[:sizes.timed], sizes.rank, sizes.repeats, root)
    except Exception as exc:  # noqa: BLE001 - recorded and shown: the rows above are kept, the vLLM keys left out
        log.exception("bench lora: the vLLM rows failed")
        vllm = {"error": f"{type(exc).__name__}: {exc}"}
    largest = [r for r in rows if r["rank"] == max(r["rank"] for r in rows)]
    ours_cold = statistics.median(r["tangram_cold_s"] for r in largest)
    peer_cold = statistics.median(min(r["peft_cold_s"], r["peft_cold_lowmem_s"]) for r in largest)
    summary = {"adapter_load_speedup_vs_peft": ratio(peer_cold, ours_cold),
               "adapter_cold_load_s": round(ours_cold, 5),
               "adapter_pool_hit_ms": round(statistics.median(r["tangram_pool_ms"] for r in rows), 4),
               "mixed_batch_tokens_per_s_vs_base": ratio(mixed["mixed_tokens_per_s"], mixed["base_tokens_per_s"]),
               **vllm.get("summary", {})}
    config = {**asdict(sizes), "base": spec.name, "base_bytes": base.index.total_bytes, "compute_dtype": SHORT[dtype],
              "read_probe_before_loads": probed, "tangram_hashes_every_read": REHASH,
              "targets": TARGETS,
              "mixed_batch": mixed, "mixed_batch_peft_default_targets": {**mixed_qv, "targets": PEFT_DEFAULT,
              "tokens_per_s_vs_base": ratio(mixed_qv["mixed_tokens_per_s"], mixed_qv["base_tokens_per_s"])}, "peer": "peft PeftModel.load_adapter (safetensors), the faster of "
              "low_cpu_mem_usage False / True", "torch_threads": torch.get_num_threads(),
              "vllm": {k: v for k, v in vllm.items() if k != "summary"}}
    result = result_doc("lora", "cpu", config, rows, summary)
    cols = [Column("adapter", "adapter", justify="left"), Column("bytes", "bytes"),
            Column("tangram_cold_s", "tangram cold s", fmt_num(4)), Column("tangram_dram_s", "dram s", fmt_num(4)),
            Column("tangram_pool_ms", "pool ms", fmt_num(3)), Column("peft_cold_s", "peft cold s", fmt_num(4)),
            Column("peft_cold_lowmem_s", "peft cold lowmem s", fmt_num(4)),
            Column("peft_dram_s", "peft dram s", fmt_num(4)), Column("speedup_cold", "speedup", fmt_num(2)),
            Column("raw_read_cold_s", "raw read s", fmt_num(4))]
    print_table(console, "adapter loads (every bound adapter equal to PEFT's)", cols, rows)
    console.print(f"mixed batch: {mixed}")
    console.print(f"mixed batch, adapters on PEFT's default targets {PEFT_DEFAULT}: {mixed_qv}")
    console.print(f"vLLM rows: {vllm.get('rows', vllm.get('note'))}" if "error" not in vllm
                  else f"[red]vLLM rows failed: {vllm['error']}[/red]")
    print_summary(console, "bench lora summary", summary)
    if json_path is not None:
        write_result(result, json_path)
    return result
