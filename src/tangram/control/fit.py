"""Whether a model can ever run in a device pool: its weights and the least KV cache an instance needs.

All of a model's distinct tensors are resident at once while it runs (shared
ones too: sharing saves loading, not room), each in its own aligned extent, and
an instance needs KV blocks from the same pool: at least one block in elastic
mode, its whole reservation in reserve mode (taken at start). A model whose
total exceeds a pool's capacity can never start there, however long it waits;
the controller refuses such a deploy at once, and never starts it on a pool too
small (`Footprint.fits`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from tangram.engine import EngineConfig
from tangram.kv import KVMode
from tangram.kv.spec import KVSpec
from tangram.pool.arena import POOL_ALIGNMENT
from tangram.pool.capacity import format_bytes
from tangram.store import CheckpointIndex
from tangram.store.format import align_up

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Footprint:
    """Pool bytes one instance of a model needs at least: `weights` (aligned distinct tensors) + `kv`."""

    weights: int
    kv: int

    @property
    def total(self) -> int:
        """Weights plus the least KV."""
        return self.weights + self.kv

    def fits(self, capacity: int) -> bool:
        """Whether an empty pool of `capacity` bytes could hold an instance."""
        return self.total <= capacity


class DoesNotFit(ValueError):
    """A deployment needs more bytes than the largest device pool holds."""


def _aligned(nbytes: int, alignment: int) -> int:
    return max(align_up(nbytes, alignment), alignment)


def weights_bytes(index: CheckpointIndex, alignment: int = POOL_ALIGNMENT) -> int:
    """Arena bytes of a checkpoint's distinct tensors (one extent per content key, as the pool places them)."""
    distinct = {e.key: e.nbytes for e in index.tensors.values()}
    return sum(_aligned(n, alignment) for n in distinct.values())


def min_kv_bytes(spec: KVSpec, engine: EngineConfig, context: int | None, alignment: int = POOL_ALIGNMENT) -> int:
    """Least KV bytes an instance takes: one block (elastic), or its reservation (reserve mode, as the
    instance computes it: `reserve_tokens`, else max_batch x the model length)."""
    block = _aligned(spec.block_bytes, alignment)
    if engine.kv_mode is not KVMode.RESERVE:
        return block
    lengths = [x for x in (context, engine.max_model_len) if x is not None]
    tokens = engine.reserve_tokens or (engine.reserve_batch() * min(lengths) if lengths else spec.block_tokens)
    return spec.blocks_for(tokens) * block


def footprint(path: Path, index: CheckpointIndex, engine: EngineConfig, backend: str = "builtin") -> Footprint:
    """The footprint of a checkpoint's model under `engine` (reads its config: call off the event loop).

    KV geometry comes from the model config in the compute dtype; a config that cannot be read counts
    no KV here (the start then fails with its own error). A vLLM instance is charged its KV cache and its
    engine's own copy of the weights (docs/vllm.md).
    """
    from transformers import AutoConfig

    from tangram.engine.skeleton import compute_dtype

    weights = weights_bytes(index)
    if backend == "vllm":
        return Footprint(weights, engine.kv_cache_bytes + index.total_bytes)
    try:
        config = AutoConfig.from_pretrained(path)
        text = config.get_text_config()
        context = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)
        dtype: torch.dtype = compute_dtype(e.torch_dtype for e in index.tensors.values())
        spec = KVSpec.from_config(config, dtype, engine.block_tokens)
    except (OSError, ValueError, AttributeError, TypeError) as exc:
        log.debug("%s: no KV geometry (%s); counting weights only", path, exc)
        return Footprint(weights, 0)
    return Footprint(weights, min_kv_bytes(spec, engine, context))


def check_fits(name: str, need: Footprint, capacities: dict[str, int]) -> None:
    """Raise DoesNotFit (a clear message: bytes needed and the largest pool) unless some pool can hold it."""
    if not capacities:
        return
    largest, cap = max(capacities.items(), key=lambda kv: kv[1])
    if need.fits(cap):
        return
    raise DoesNotFit(
        f"deployment {name!r} needs {need.total} bytes ({format_bytes(need.total)}: weights {need.weights} + "
        f"minimum KV {need.kv}) but the largest device pool, {largest}, holds {cap} bytes "
        f"({format_bytes(cap)}); give the server a larger pool (tangram serve --pool-capacity, "
        "TANGRAM_POOL_CAPACITY or pool_capacity in its config)")
