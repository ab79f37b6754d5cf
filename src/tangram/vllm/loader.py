"""The `tangram` vLLM model loader: vLLM's parameters filled from the tensors in Tangram's pool, never from files.

vLLM builds the model, this loader feeds `model.load_weights` the checkpoint's tensors as views into the pool's
arena (vLLM's weight loaders fuse q/k/v and gate/up and copy into its parameters), and vLLM's own
`process_weights_after_loading` packs them for its kernels. Imported only in a vLLM process.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator

import torch
from torch import nn
from vllm.config import ModelConfig
from vllm.config.load import LoadConfig
from vllm.model_executor.model_loader.base_loader import BaseModelLoader

from tangram.vllm.messages import BindSpec, TensorRef
from tangram.vllm.weights import iter_weights, tied_groups

log = logging.getLogger(__name__)
PENDING: list[BindSpec] = []  # the spec of the engine being built in this process (it may carry a CUDA arena)
LOADS: list[float] = []  # seconds of each load_weights in this process (the shell reports them)


def spec_to_config(spec: BindSpec) -> dict:
    """A spec as `model_loader_extra_config` (JSON-able; a CUDA arena travels through `PENDING` instead)."""
    d = dataclasses.asdict(dataclasses.replace(spec, arena=None))
    return {"bind": d}


def spec_from_config(extra: dict) -> BindSpec | None:
    """The spec in a `model_loader_extra_config`, or None."""
    d = (extra or {}).get("bind")
    if d is None:
        return None
    tensors = tuple(TensorRef(t["name"], t["offset"], t["nbytes"], t["dtype"], tuple(t["shape"])) for t in d["tensors"])
    return BindSpec(tensors, d["arena_bytes"], d["arena_path"], None, d.get("key", ""))


class TangramModelLoader(BaseModelLoader):
    """Loads a vLLM model's weights from Tangram's device pool (`load_format="tangram"`)."""

    def __init__(self, load_config: LoadConfig) -> None:
        super().__init__(load_config)
        self.spec = PENDING[-1] if PENDING else spec_from_config(load_config.model_loader_extra_config)

    def download_model(self, model_config: ModelConfig) -> None:
        """Nothing to download: the weights are in the pool."""

    def get_all_weights(self, model_config: ModelConfig, model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        """The checkpoint's tensors, as views into the pool (vLLM's reload path calls this)."""
        if self.spec is None:
            raise ValueError("the tangram model loader has no weights: Tangram binds them from its pool")
        return iter_weights(self.spec)

    def load_weights(self, model: nn.Module, model_config: ModelConfig) -> None:
        """Feed the pool's tensors to the model's weight loaders; every parameter must be filled. Without a spec
        (a pre-warmed shell, bound later) the parameters are zeroed: vLLM's warm-up runs on finite numbers."""
        t0 = time.perf_counter()
        spec = self.spec
        if spec is None:
            with torch.no_grad():
                for p in model.parameters():
                    p.zero_()
            log.info("tangram loader: no weights yet (a pre-warmed shell); parameters zeroed until bound")
            return
        loaded = model.load_weights(self.get_all_weights(model_config, model))
        if loaded is not None:
            missing = _unfilled(model, set(loaded))
            if missing:
                raise ValueError(f"weights not found in Tangram's pool for: {sorted(missing)[:8]}")
        LOADS.append(time.perf_counter() - t0)
        log.info("tangram loader: %d tensors from the pool in %.3f s", len(spec.tensors), LOADS[-1])


def bind_on_worker(worker, spec: BindSpec) -> None:
    """Re-bind a built engine's weights from the pool (run in vLLM's worker by `collective_rpc`): vLLM's in-place
    layerwise reload, then the tied parameters re-tied and re-processed, which that reload leaves to one of the
    tied modules (a tied LM head would keep the kernel it packed from the previous weights)."""
    model = worker.model_runner.get_model()
    groups = tied_groups(model)
    worker.model_runner.reload_weights(weights_iterator=iter_weights(spec))
    for owner, others in groups:
        for module in others:
            module.weight = owner.weight
            method = getattr(module, "quant_method", None)
            if method is not None and hasattr(method, "process_weights_after_loading"):
                method.process_weights_after_loading(module)


def _unfilled(model: nn.Module, loaded: set[str]) -> set[str]:
    """Parameters no checkpoint tensor filled, except those of modules whose quant method rebuilds them after
    loading (vLLM's default loader exempts the same ones)."""
    exempt = set()
    for name, module in model.named_modules():
        if getattr(getattr(module, "quant_method", None), "process_weights_after_loading", None):
            exempt |= {f"{name}.{p}" if name else p for p, _ in module.named_parameters()}
    return {n for n, _ in model.named_parameters()} - loaded - exempt
