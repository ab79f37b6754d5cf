"""Warming an architecture's operators before its weights arrive: a one-layer forward on the same shapes."""

from __future__ import annotations

import copy
import logging
import threading
import time

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig

from tangram.templates.template import Template

log = logging.getLogger(__name__)
_warmed: set[tuple] = set()
_lock = threading.Lock()


def warm(config: PretrainedConfig, template: Template, dtype: torch.dtype, device: torch.device | str) -> float:
    """Run a one-layer model of this architecture (same widths, zero weights) on the template's prompt length.

    Triggers lazy module imports and kernel selection (on CUDA: context, cuBLAS
    handles, kernel loading) once per architecture, dtype and device in this
    process; returns the seconds spent (0 when already warm).
    """
    key = (template.architecture, str(dtype), str(device), template.prefill_tokens)
    with _lock:
        if key in _warmed:
            return 0.0
        _warmed.add(key)
    t0 = time.perf_counter()
    cfg = copy.deepcopy(config)
    cfg.num_hidden_layers = 1
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = cfg.layer_types[:1]
    cfg.vocab_size = min(cfg.vocab_size, 512)
    with torch.device("meta"):
        # the engine's packed attention needs its step's metadata: the warm-up runs transformers' SDPA instead
        tiny = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    tiny = tiny.to_empty(device=device).eval()
    with torch.no_grad():
        for t in (*tiny.parameters(), *tiny.buffers()):
            if t.is_floating_point():
                t.zero_()
    ids = torch.zeros(1, max(1, template.prefill_tokens), dtype=torch.long, device=device)
    with torch.inference_mode():
        tiny(input_ids=ids, use_cache=False)
    seconds = time.perf_counter() - t0
    log.info("warmed %s (%s, %s) in %.3f s", template.architecture, dtype, device, seconds)
    return seconds
