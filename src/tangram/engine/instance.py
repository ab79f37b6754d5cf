"""A model instance: pooled weights bound into a skeleton, tokenizer, KV allocator and engine.

Starting one is the cold start: load (acquire the weights from the device
pool, loading only what is not resident), init (model skeleton on the meta
device with the pooled tensors assigned, tokenizer), KV (the allocator; in
`reserve` mode the maximum KV size is taken now). Closing one releases the
weights to the pool, where they stay retained for the next start.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from transformers import GenerationConfig

from tangram.engine.dtype import DTYPES, DtypeSetting, compute_dtype
from tangram.engine.engine import Engine
from tangram.engine.errors import EngineError
from tangram.engine.lora import AdapterSet
from tangram.engine.prepack import PACKED, prepack, unpack
from tangram.engine.prepack import available as prepack_available
from tangram.engine.request import Request
from tangram.engine.runner import ModelRunner
from tangram.engine.skeleton import RUNTIME
from tangram.engine.stages import StartCost
from tangram.engine.step_policy import derived_max_batch
from tangram.kv import KVAllocator, KVMode, KVSpec
from tangram.paths import file_version
from tangram.pool import DevicePool
from tangram.store import Checkpoint, LoadStats
from tangram.templates import (
    Recorder, Template, WaitForWeights, checkpoint_id, libraries, load_template, names_by_param, save_template, warm,
)

log = logging.getLogger(__name__)
RESERVE_BATCH = 16  # the batch a KV reservation is sized for unless max_batch says otherwise


VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM 0.32 accepts


class EngineConfig(BaseModel):
    """Engine settings of an instance."""

    model_config = ConfigDict(extra="forbid")

    kv_mode: KVMode = KVMode.ELASTIC
    block_tokens: int = Field(16, ge=1, le=4096)
    max_batch: int | None = Field(None, ge=1, le=4096, description="sequences one step runs at most. Default: "
                                  "elastic KV: derived from the KV that fits (engine/step_policy.py); reserve: 16")
    max_model_len: int | None = Field(None, ge=2, description="default: the model's context length")
    max_step_tokens: int = Field(2048, ge=1, description="tokens one step runs at most: every decode, then "
                                 "prompt chunks (chunked prefill) up to this budget")
    reserve_tokens: int | None = Field(None, ge=1, description="reserve mode: KV tokens to take at start "
                                       "(default max_batch x max_model_len)")
    overlap: Literal["auto", "on", "off"] = Field(
        "auto", description="with a template, run the first prefill while loading (execute-while-load); auto: on "
        "CUDA devices only, since on CPUs measured starts were slower with it (docs/templates.md)")
    prepack: Literal["auto", "on", "off"] = Field(
        "auto", description="run Linear layers through weights packed once in oneDNN's layout (CPU only; a copy "
        "outside the pool, cached by tensor identity: engine/prepack.py). auto: on where PyTorch has oneDNN")
    kv_cache_bytes: int = Field(1 << 30, ge=1 << 20, description="vllm backend: the KV cache its engine reserves "
                                "(charged to the pool as active bytes while the instance runs)")
    max_loras: int = Field(0, ge=0, le=256, description="vllm backend: LoRA adapters one engine step serves at "
                           "once (vLLM's max_loras); 0: LoRA off in its engine. The built-in engine serves any "
                           "number whatever this is")
    max_lora_rank: Literal[VLLM_LORA_RANKS] = Field(  # type: ignore[valid-type]
        16, description="vllm backend: the largest adapter rank its engine serves (vLLM's max_lora_rank, one of "
        "the values vLLM 0.32 accepts)")
    templates: bool = Field(True, description="record a start-up template on the first run; with one, load in "
                            "first-use order and execute while loading")
    dtype: DtypeSetting = Field(
        "auto", description="compute dtype. auto: the checkpoint's own on CUDA; on a CPU a 16-bit checkpoint "
        "computes in the CPU's fastest dtype (bfloat16 where it has native bf16, else float32) and a float32 one "
        "stays float32. A dtype other than the checkpoint's loads a converted copy, made once at deploy")

    def reserve_batch(self) -> int:
        """The batch size a KV reservation is sized for (reserve mode)."""
        return self.max_batch or RESERVE_BATCH

    def overlaps(self, device: torch.device | str) -> bool:
        """Whether execute-while-load is on for `device`."""
        return self.overlap == "on" or (self.overlap == "auto" and torch.device(device).type == "cuda")


def _eos_ids(path: Path, tokenizer) -> set[int]:
    ids = set(_generation_eos(path, file_version(path / "generation_config.json")))
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


@functools.lru_cache(maxsize=256)
def _generation_eos(path: Path, version: tuple[int, int, int] | None) -> tuple[int, ...]:
    """The generation config's eos ids, read once per file version (a pool-hit start reads no JSON)."""
    try:
        eos = GenerationConfig.from_pretrained(path).eos_token_id
    except OSError:
        return ()
    return tuple(eos if isinstance(eos, list) else [eos] if eos is not None else [])


class Instance:
    """One running model on one device pool; `close()` (or a with block) releases it."""

    def __init__(self, checkpoint: Checkpoint | str | Path, pool: DevicePool, config: EngineConfig | None = None,
                 *, name: str | None = None, arrival: float | None = None) -> None:
        self.config = config or EngineConfig()
        self.pool = pool
        ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint(checkpoint)
        stored = compute_dtype(e.torch_dtype for e in ckpt.index.tensors.values())
        if self.config.dtype != "auto" and stored != DTYPES[self.config.dtype]:
            raise EngineError(f"{ckpt.path} is stored in {stored} but dtype {self.config.dtype} was asked for: "
                              "start its converted copy (tangram.resolve.resolve_model(..., dtype=...))")
        self.checkpoint, self.path = ckpt, ckpt.path
        self.name = name or ckpt.path.name
        self.model = None
        self.adapters: AdapterSet | None = None  # LoRA adapters bound from the pool on first use
        self.packed: list[str] = []  # identities of the packed weights this instance holds
        self.waits: WaitForWeights | None = None
        t0 = time.perf_counter()
        self.arrival = t0 if arrival is None else arrival
        self.template = load_template(ckpt.path) if self.config.templates else None
        if self.template is not None:  # load in first-use order; with overlap, on a thread while the forward runs
            self.binding = pool.acquire(ckpt, model=name, order=self.template.groups,
                                        background=self.config.overlaps(pool.device))
        else:
            self.binding = pool.acquire(ckpt, model=name)
        t1 = time.perf_counter()
        try:
            self.engine = self._build(ckpt.path)
            loading = self.binding.loading
            if loading.done() and loading.error is not None:
                raise loading.error  # the background load failed before any forward could notice
        except BaseException:
            self._release()
            raise
        t2 = time.perf_counter()
        b = self.binding
        self.cost = StartCost(start="cold", init_s=t2 - t1, load_s=t1 - t0, bytes_loaded=b.bytes_loaded,
                              bytes_reused=b.bytes_reused, load_begin=t0 - self.arrival, load_end=t1 - self.arrival)
        self._finalized = False
        self._cost_lock = threading.Lock()
        self.engine.ready_at = t2
        self.engine.output.on_first_token = self._first_token
        if b.loading.done():
            self.finalize_cost()

    def finalize_cost(self) -> None:
        """Fill the load figures once the load is over (waits for a background load). Thread-safe."""
        with self._cost_lock:
            self._finalize_locked()

    def _finalize_locked(self) -> None:
        if self._finalized:
            return
        b = self.binding
        if b.bytes_loaded and b.loading.span()[0]:  # a pool hit loads nothing: its acquire stays in load_s
            b.loading.wait()
            began, ended = b.loading.span()
            self.cost.load_s = ended - began
            self.cost.load_begin, self.cost.load_end = began - self.arrival, ended - self.arrival
            self.engine.ready_at = max(self.engine.ready_at, ended)
        stats = b.wait_loaded()
        self.cost.start = StartCost.classify(b.bytes_loaded, stats.bytes_from_cache if stats else 0)
        self._finalized = True
        log.info("started %s on %s: %s, load %.3f s (%d B loaded, %d B reused), init %.3f s%s", self.name,
                 self.pool.device, self.cost.start, self.cost.load_s, b.bytes_loaded, b.bytes_reused,
                 self.cost.init_s, " (template: overlapped)" if self.template else "")

    def _first_token(self, req: Request) -> None:
        """A request's first token: a background load is over once a forward has used every weight; a request
        that waited for this start is charged with its cost."""
        self.finalize_cost()
        if req.arrival <= self.engine.ready_at:
            req.stages.charge_start(self.cost)

    def load_stats(self) -> LoadStats | None:
        """What this start's load read, from where (waits for a background load)."""
        return self.binding.wait_loaded()

    def freeable_bytes(self) -> int:
        """Pool bytes that closing this instance gives back: weights no other instance holds, its KV reserve."""
        return self.pool.exclusive_bytes(self.binding) + self.kv.reserved_bytes

    def _release(self) -> None:
        self.binding.loading.wait()  # never free pool bytes a load thread still writes
        if self.waits is not None:  # a load that never finished (or failed) leaves its hooks: never on a kept skeleton
            self.waits.remove()
            self.waits = None
        if self.adapters is not None:
            self.adapters.close()
            self.adapters = None
        PACKED.release(self.packed)
        self.packed = []
        if self.model is not None:
            RUNTIME.release(self.model)
            self.model = None
        self.pool.release(self.binding)

    def _build(self, path: Path) -> Engine:
        cfg = self.config
        model = RUNTIME.model(path, self.binding.tensors)  # a kept skeleton re-bound, or a new build
        self.model = model
        tokenizer = RUNTIME.tokenizer(path)
        text = model.config.get_text_config()
        context = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)
        if context is None and cfg.max_model_len is None:
            raise EngineError(f"{path}: the config gives no context length; set max_model_len")
        max_len = min(x for x in (context, cfg.max_model_len) if x is not None)
        dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        spec = KVSpec.from_config(model.config, dtype, cfg.block_tokens)
        weights = self.pool.footprint(self.binding)
        if cfg.kv_mode is KVMode.RESERVE:
            reserve = spec.blocks_for(cfg.reserve_tokens or cfg.reserve_batch() * max_len)
            self.kv = KVAllocator(self.pool, spec, KVMode.RESERVE, reserve)
            limit = reserve
            max_batch = cfg.reserve_batch()
        else:
            self.kv = KVAllocator(self.pool, spec, KVMode.ELASTIC)
            limit = max(0, self.pool.capacity - weights) // self.kv.block_size
            max_batch = cfg.max_batch or derived_max_batch(limit)
        landing = not self.binding.loading.all_landed()
        if cfg.prepack != "off" and not landing and prepack_available(self.pool.device):
            index = self.checkpoint.index
            idents = {t.data_ptr(): index.entry(n).key for n, t in self.binding.tensors.items()}
            self.packed = prepack(model, idents, hint=min(max_batch, 64))
        else:
            unpack(model)
        runner = ModelRunner(model, self.kv)
        if self.template is not None and landing:  # this start's load, or another's of tensors both share
            self.waits = runner.waits = WaitForWeights(model, self.binding.loading)
            warm(model.config, self.template, dtype, self.pool.device)
        elif cfg.templates and self.template is None:
            runner.recorder = Recorder(model, names_by_param(model, self.binding.tensors))
            runner.on_recorded = lambda rec, tokens: self._save_template(rec, tokens, model)
        self.adapters = AdapterSet(self.pool, model, self.checkpoint, owner=self.name)
        return Engine(runner, tokenizer, max_model_len=max_len, eos_token_ids=_eos_ids(path, tokenizer),
                      max_batch=max_batch, max_step_tokens=cfg.max_step_tokens, max_kv_blocks=limit,
                      adapters=self.adapters)

    def _save_template(self, rec: Recorder, tokens: int, model) -> None:
        names = list(self.checkpoint.index.tensors)
        template = Template(checkpoint_id=checkpoint_id(self.path), libraries=libraries(),
                            architecture=type(model).__name__, groups=rec.groups(names), prefill_tokens=tokens)
        try:
            path = save_template(self.path, template)
            log.info("recorded the start-up template of %s: %s", self.name, path)
        except OSError as exc:
            log.warning("could not store the start-up template of %s: %s", self.name, exc)

    def close(self) -> None:
        """Abort what is left, free KV (and any reservation), release the weights (they stay retained)."""
        self.engine.shutdown()
        self.kv.close()
        self._release()

    def __enter__(self) -> Instance:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
