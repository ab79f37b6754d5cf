"""LoRA adapters in a vLLM shell: vLLM's own LoRA support, with the adapter tensors taken from Tangram's pool.

vLLM's worker loads an adapter with `LoRAModel.from_local_checkpoint(directory, ...)`, which reads the
directory's safetensors. A shell sets its worker's LoRA model class to `PoolLoRAModel` (`use_pool_loras`): its
loader takes the tensors the parent bound under that adapter's id (`bind`: copied once from the pool's arena,
since vLLM scales them in place) and never reads a tensor file, and vLLM's own code does the rest (the PEFT
config, its checks, the copy into its LoRA slots, the punica kernels). Imported only in a vLLM process.

`fix_no_lora_rows` corrects vLLM's CPU LoRA ops, which apply the last slot's adapter to rows of no adapter.
"""

from __future__ import annotations

import logging

import torch
from vllm.lora.lora_model import LoRAModel

from tangram.vllm.messages import BindSpec
from tangram.vllm.weights import iter_weights

log = logging.getLogger(__name__)
PREFIX = "base_model.model."  # PEFT's prefix of tensor names, which the converted adapter drops
POOLED: dict[int, dict[str, torch.Tensor]] = {}  # bound adapters' tensors (PEFT names), by vLLM's lora_int_id


def bind(lora_id: int, spec: BindSpec) -> None:
    """Make the adapter tensors of `spec` what adapter `lora_id` loads: copies of the pool's, since vLLM changes
    an adapter's tensors in place (it folds the scaling into B), and the pool's bytes are shared by content."""
    POOLED[lora_id] = {PREFIX + name: t.clone() for name, t in iter_weights(spec)}


def unbind(lora_id: int) -> None:
    """Forget adapter `lora_id`'s tensors (vLLM has removed it)."""
    POOLED.pop(lora_id, None)


class PoolLoRAModel(LoRAModel):
    """vLLM's LoRA model, loaded from the tensors bound in `POOLED` instead of the adapter's files."""

    @classmethod
    def from_local_checkpoint(cls, lora_dir: str, expected_lora_modules: set[str], peft_helper, *,
                              lora_model_id: int | None = None, device: str = "cuda",
                              dtype: torch.dtype | None = None, model_vocab_size: int | None = None,
                              weights_mapper=None, skip_prefixes: list[str] | None = None,
                              **_unused) -> LoRAModel:
        """The adapter `lora_model_id` from the pool (vLLM's checks of its modules, then its own builder)."""
        tensors = POOLED.get(lora_model_id)
        if tensors is None:
            raise ValueError(f"LoRA adapter {lora_dir} (id {lora_model_id}) is not bound from Tangram's pool")
        modules = {name.split(".lora_")[0] for name in tensors}
        unexpected = sorted(m for m in modules if m.rsplit(".", 1)[-1] not in expected_lora_modules)
        if unexpected:
            raise ValueError(f"LoRA adapter {lora_dir} targets modules vLLM cannot adapt in this model: "
                             f"{unexpected[:4]} (vLLM adapts {sorted(expected_lora_modules)})")
        return cls.from_lora_tensors(lora_model_id=lora_model_id, tensors=tensors, peft_helper=peft_helper,
                                     device=device, dtype=dtype, model_vocab_size=model_vocab_size,
                                     weights_mapper=weights_mapper, skip_prefixes=skip_prefixes)


def use_pool_loras(worker) -> None:
    """Load this worker's adapters from the pool (run in vLLM's worker by `collective_rpc`)."""
    manager = getattr(worker.model_runner, "lora_manager", None)
    if manager is None or not hasattr(manager, "_lora_model_cls"):
        raise RuntimeError("this vLLM's worker has no LoRA manager Tangram knows how to feed from its pool "
                           f"({type(worker.model_runner).__name__})")
    manager._lora_model_cls = PoolLoRAModel  # the class its loader calls (a constructor argument vLLM keeps)


def skips_no_lora_rows(op) -> bool:
    """Whether `op` (a bgmv shrink) leaves a row of index -1 ("no adapter") alone."""
    out = torch.zeros(1, 2)
    op(torch.ones(1, 3), torch.ones(1, 2, 3), out, torch.tensor([-1]), 1.0)
    return not bool(out.any())


def _masked(op):
    """`op` (a bgmv op: inputs, weights, output, indices, ...) computing no update for rows of index -1: their
    inputs are zeroed and their index pointed at slot 0, so they add (or write) exact zeros."""

    def run(inputs: torch.Tensor, weights: torch.Tensor, output: torch.Tensor, indices: torch.Tensor, *rest):
        none = indices < 0
        if bool(none.any()):
            inputs = inputs.masked_fill(none.unsqueeze(-1), 0)
            indices = indices.clamp(min=0)
        return op(inputs, weights, output, indices, *rest)

    run.__wrapped__ = op
    return run


def fix_no_lora_rows() -> bool:
    """Correct vLLM's CPU LoRA ops where they gather the weights of index -1, which marks a row of no adapter,
    as the last slot's (Python indexing): a base request batched with adapter requests then gets an adapter's
    update (seen in vLLM 0.32's CPU build; vllm-project/vllm#48421 and #49656 were open). Only where the
    installed ops have the fault; whether it was applied."""
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    if skips_no_lora_rows(lora_ops.bgmv_shrink):
        return False
    for name in ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice"):
        fixed = _masked(getattr(lora_ops, name))
        setattr(lora_ops, name, fixed)  # the sgmv ops call these by module global
        if hasattr(punica_cpu, name):
            setattr(punica_cpu, name, fixed)  # imported by name there
    log.warning("vLLM's CPU LoRA ops applied an adapter to rows of no adapter: using Tangram's corrected ops")
    return True
