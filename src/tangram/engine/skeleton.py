"""Build a transformers model skeleton without allocating weights, then bind loaded tensors into it.

Parameters are created on the meta device (no memory, no random init) and the
loaded tensors are assigned in place (`load_state_dict(assign=True)`), so the
model uses the loader's buffers directly, with no copy.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path

import torch
from accelerate import init_empty_weights
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from tangram.store.errors import CheckpointError

# accelerate's init_empty_weights patches nn.Module.register_parameter process-wide, which would turn the
# tensors another thread assigns meanwhile into meta tensors: builds are serialised.
_BUILD_LOCK = threading.Lock()


def build_causal_lm(checkpoint: str | Path, tensors: Mapping[str, torch.Tensor]) -> PreTrainedModel:
    """A causal LM of the checkpoint's architecture whose parameters are exactly `tensors`."""
    path = Path(checkpoint)
    config = AutoConfig.from_pretrained(path)
    dtype = next((t.dtype for t in tensors.values() if t.is_floating_point()), torch.float32)
    device = next(iter(tensors.values())).device if tensors else torch.device("cpu")
    with _BUILD_LOCK:
        with init_empty_weights(include_buffers=False):  # buffers (rotary tables) stay real
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        result = model.load_state_dict(dict(tensors), assign=True, strict=False)
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise CheckpointError(path, f"checkpoint lacks {len(missing)} parameters of the model, e.g. {missing[:3]}")
    if result.unexpected_keys:
        raise CheckpointError(path, f"checkpoint has tensors the model does not use, e.g. {result.unexpected_keys[:3]}")
    for module in model.modules():  # move the (few, small) buffers next to the weights
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf is not None and buf.device != device:
                module._buffers[name] = buf.to(device)
    return model.eval()
