"""Workload of `tangram bench kv`: small real-architecture models (a family and unrelated ones) and a bursty trace.

Models are transformers Qwen2 / Llama configs with a few layers and random fp32
weights (a word-level tokenizer alongside), saved as Hugging Face directories
and converted to Tangram's format, so the engine can start real instances. A
*family* is a base and variants that differ from it in one or two layers; every
other tensor is byte-identical, so the device pool shares it by content.
Checkpoints are cached under a directory keyed by a hash of the specs.

The trace is pure and seeded: gamma inter-arrival times with a high
coefficient of variation (bursts and long quiet gaps), Zipf-skewed model
choice over a seeded ranking (both `tangram.workload`'s), and per request a
prompt of random token ids and a max_tokens, both drawn from ranges.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import shutil
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from tangram.store import Checkpoint, convert, read_index
from tangram.workload import ModelSpec, TraceShape, arrivals, family, transformer, zipf_popularity
from tangram.workload import trace_stats as arrival_stats

log = logging.getLogger(__name__)

WORKLOAD_VERSION = 1  # bump when the contents or layout of generated checkpoints change
DONE = "done.json"


def make_models(size: str = "quick") -> list[ModelSpec]:
    """The models of a run ("quick" and "full" share them: about 3-14 MB each, fp32)."""
    if size not in ("quick", "full"):
        raise ValueError(f"unknown size {size!r}")
    base = transformer("qwen-base", "qwen2", 256, 768, 4, 8, 2, 2048, 1024, seed=1)
    return [*family(base, {"qwen-chat": (3,), "qwen-code": (2, 3)}),
            transformer("llama-solo", "llama", 256, 640, 4, 8, 2, 2048, 1024, seed=2),
            transformer("llama-mini", "llama", 128, 384, 2, 4, 2, 2048, 1024, seed=3)]


# --------------------------------------------------------------------------- checkpoints


def _save_tokenizer(directory: Path, vocab_size: int) -> None:
    """A word-level fast tokenizer ("w3 w17 ..." <-> ids) with <unk>/<s>/</s> as ids 0/1/2."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"w{i}": i for i in range(3, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<unk>")
    fast.save_pretrained(directory)


def build_model(m: ModelSpec, by_name: dict[str, ModelSpec]):
    """The transformers model of `m`: its base's weights with the `changed` layers re-drawn (seeded)."""
    from transformers import AutoModelForCausalLM

    base = by_name[m.base] if m.base is not None else m
    torch.manual_seed(base.seed)
    model = AutoModelForCausalLM.from_config(base.transformers_config(), dtype=base.torch_dtype).eval()
    if m.base is not None:
        gen = torch.Generator().manual_seed(m.seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if any(name.startswith(f"model.layers.{i}.") for i in m.changed):
                    p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    model.generation_config.eos_token_id = None  # benchmarks generate exactly max_tokens
    model.generation_config.pad_token_id = 0
    return model


def spec_hash(models: list[ModelSpec]) -> str:
    """A short hash of the model specs, the generator version and torch's (the cache key; init is torch's)."""
    text = json.dumps({"version": WORKLOAD_VERSION, "torch": torch.__version__,
                       "models": [asdict(m) for m in models]}, sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class ModelPaths:
    """Where one model lives: its Hugging Face directory and its Tangram checkpoint."""

    hf: Path
    ckpt: Path


def ensure_models(models: list[ModelSpec], root: Path,
                  step: Callable[[str], None] | None = None) -> dict[str, ModelPaths]:
    """Write every model (HF directory + Tangram checkpoint) under `root/<spec hash>/<name>` unless there."""
    by_name = {m.name: m for m in models}
    base_dir = root / spec_hash(models)
    out: dict[str, ModelPaths] = {}
    for m in models:
        target = base_dir / m.name
        paths = ModelPaths(target / "hf", target / "ckpt")
        out[m.name] = paths
        try:
            done = json.loads((target / DONE).read_text()) == json.loads(json.dumps(asdict(m)))
            read_index(paths.ckpt)
        except Exception:  # noqa: BLE001 - anything missing or wrong means regenerate
            done = False
        if done:
            continue
        if step:
            step(m.name)
        tmp = base_dir / f".{m.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            model = build_model(m, by_name)
            model.save_pretrained(tmp / "hf")
            _save_tokenizer(tmp / "hf", m.vocab)
            convert(tmp / "hf", tmp / "ckpt")
            (tmp / DONE).write_text(json.dumps(asdict(m)))
            shutil.rmtree(target, ignore_errors=True)
            tmp.rename(target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("wrote bench kv model %s under %s", m.name, target)
    return out


# --------------------------------------------------------------------------- trace


@dataclass(frozen=True)
class TraceRequest:
    """One request of the trace: arrival (trace seconds), model, prompt token ids, tokens to generate."""

    t: float
    model: str
    prompt: tuple[int, ...]
    max_tokens: int


def make_trace(models: list[ModelSpec], spec: TraceShape, seed: int) -> tuple[list[TraceRequest], dict[str, float]]:
    """A seeded trace over `models` and the popularity (Zipf over a seeded ranking) it was drawn with."""
    rng = random.Random(seed * 1_000_003 + 7)
    popularity = zipf_popularity([m.name for m in models], spec.zipf_s, rng)
    vocab = {m.name: m.vocab for m in models}
    trace: list[TraceRequest] = []
    for t, model in arrivals(rng, spec, popularity):
        n_prompt = rng.randint(*spec.prompt_tokens)
        prompt = tuple(rng.randrange(3, vocab[model]) for _ in range(n_prompt))
        trace.append(TraceRequest(round(t, 6), model, prompt, rng.randint(*spec.max_tokens)))
    return trace, popularity


def trace_stats(trace: list[TraceRequest]) -> dict[str, float]:
    """Gap CV, duration and request mix (`tangram.workload.trace_stats`) plus request sizes (the result's config)."""
    return {**arrival_stats([r.t for r in trace], [r.model for r in trace]),
            "prompt_tokens_mean": round(statistics.fmean(len(r.prompt) for r in trace), 1) if trace else 0.0,
            "max_tokens_mean": round(statistics.fmean(r.max_tokens for r in trace), 1) if trace else 0.0}


def aligned(nbytes: int, alignment: int = 4096) -> int:
    """Bytes `nbytes` occupies in the pool: rounded up to its placement alignment, at least one unit."""
    return max(1, math.ceil(nbytes / alignment)) * alignment


def kv_block_bytes(m: ModelSpec, block_tokens: int) -> int:
    """Pool bytes of one fp32 KV block of `m` (all layers, keys and values, `block_tokens` tokens)."""
    return aligned(block_tokens * m.kv_bytes_per_token())


@dataclass(frozen=True)
class Setup:
    """What every replay of one run shares: the pool capacity and, per model, its tensors and reservation."""

    capacity: int
    unique_bytes: int  # pool bytes of every distinct tensor of every model
    keys: dict[str, dict[str, int]]  # model -> tensor identity -> pool bytes
    reserve_bytes: dict[str, int]  # model -> pool bytes a reserve-mode instance takes for KV at start
    files: dict[str, list[Path]]  # model -> its data files (dropped from the page cache before a start)


def make_setup(models: list[ModelSpec], paths: dict[str, ModelPaths], *, max_batch: int, block_tokens: int,
               headroom: float = 0.5) -> Setup:
    """Capacity = unique weight bytes + `headroom` x the largest reservation (at least one reserve instance fits).

    So all the weights do not fit beside a reserve-mode reservation, while ElasticKV's
    actual KV (a few MB) leaves them all retained.
    """
    keys: dict[str, dict[str, int]] = {}
    unique: dict[str, int] = {}
    for m in models:
        index = read_index(paths[m.name].ckpt)
        keys[m.name] = {e.key: aligned(e.nbytes) for e in index.tensors.values()}
        unique.update(keys[m.name])
    reserve = {m.name: math.ceil(max_batch * m.context / block_tokens) * kv_block_bytes(m, block_tokens)
               for m in models}
    capacity = aligned(int(sum(unique.values()) + headroom * max(reserve.values())))
    capacity = max(capacity, max(sum(keys[m.name].values()) + reserve[m.name] for m in models) + 16 * 4096)
    files = {m.name: Checkpoint(paths[m.name].ckpt).data_files() for m in models}
    return Setup(capacity, sum(unique.values()), keys, reserve, files)


class TraceClock:
    """Virtual trace time: wall time while running, frozen while paused, and jumps over idle gaps."""

    def __init__(self) -> None:
        self._base, self._since = 0.0, None  # type: float, float | None

    def now(self) -> float:
        """Current trace time (seconds)."""
        return self._base + (time.perf_counter() - self._since if self._since is not None else 0.0)

    def resume(self) -> None:
        """Let wall time count again."""
        if self._since is None:
            self._since = time.perf_counter()

    def pause(self) -> None:
        """Stop counting wall time."""
        self._base, self._since = self.now(), None

    def skip_to(self, t: float) -> None:
        """Jump forward to `t` (an idle gap)."""
        running = self._since is not None
        self.pause()
        self._base = max(self._base, t)
        if running:
            self.resume()

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Bookkeeping that must not count as trace time."""
        running = self._since is not None
        self.pause()
        try:
            yield
        finally:
            if running:
                self.resume()
