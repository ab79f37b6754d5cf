"""Tiny synthetic model sets and sizes the benchmark tests run with (tens of kB per model; CPU seconds)."""

from __future__ import annotations

from tangram.bench.coldstart_workload import Sizes
from tangram.bench.kv import QUICK as KV_QUICK
from tangram.workload import ModelSpec, family, transformer


def kv_models() -> list[ModelSpec]:
    """bench kv's set in miniature: a Qwen2 base and a variant re-drawing layer 1, and an unrelated Llama."""
    base = transformer("qwen-base", "qwen2", 64, 128, 2, 4, 2, 512, 512, seed=11)
    return [*family(base, {"qwen-chat": (1,)}), transformer("llama-solo", "llama", 64, 96, 2, 4, 2, 512, 512, seed=12)]


# bench kv parameters for the tiny set: a short trace, small batches, one repeat
KV_SMALL = {**KV_QUICK, "size": "small", "requests": 24, "prompt_tokens": (4, 24), "max_tokens": (2, 8),
            "max_batch": 4, "tp_batch": 4, "tp_prompt": 8, "tp_tokens": 8, "tp_repeats": 1, "conc_prompt": 24}


def coldstart_models() -> list[ModelSpec]:
    """bench coldstart's set in miniature: a family of two and an unrelated Llama."""
    base = transformer("fam-base", "qwen2", 64, 128, 2, 4, 2, 512, 512, seed=31)
    return [*family(base, {"fam-chat": (1,)}), transformer("solo", "llama", 64, 96, 2, 4, 2, 512, 512, seed=32)]


COLDSTART_SMALL = Sizes("small", 8, 0.05, 0.2, 8, 2, 0.6, 1)
