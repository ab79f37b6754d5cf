"""Synthetic PEFT adapters of the tiny test models, built with the `peft` library itself, and their references."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(base, directory: Path, *, seed: int, r: int = 4, alpha: float = 8,
                 targets: list[str] | None = None, **extra) -> Path:
    """A PEFT LoRA adapter of `base` with random (non-zero) A and B, saved by PEFT to `directory`."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets or ["q_proj", "v_proj", "down_proj"],
                        lora_dropout=0.0, init_lora_weights=False, **extra)
    peft_model = get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():  # larger than PEFT's init, so that every adapter changes the greedy continuation
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.mul_(3.0)
    peft_model.save_pretrained(directory)
    return directory


def peft_greedy(base, adapter_dir: Path | None, prompt: list[int], n: int) -> list[int]:
    """Greedy continuation by transformers' generate on `PeftModel.from_pretrained(base, adapter)` (the base
    alone when `adapter_dir` is None)."""
    from peft import PeftModel

    model = base if adapter_dir is None else PeftModel.from_pretrained(copy.deepcopy(base), adapter_dir).eval()
    with torch.inference_mode():
        out = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                             dtype=torch.long), max_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()
