"""Models, references and pools of the vLLM-backend tests (the vLLM interpreter runs the references)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import save_hf_dir
from tangram.engine.request import OutputQueue, RequestOutput
from tangram.engine.sampling import SamplingParams
from tangram.store import convert
from tangram.vllm.python import find_vllm_python

REFERENCE = Path(__file__).with_name("vllm_reference.py")
PROMPTS = [[5, 17, 33, 2, 90, 41], [7, 7, 120, 3]]


def vllm_or_fail() -> str:
    """The interpreter that has vLLM; a clear failure (never a skip) when the test environment lacks it."""
    found = find_vllm_python()
    if found.python is None:
        pytest.fail(f"{found.note}: `make test` installs it (make install-vllm)")
    return found.python


def _tiny(config_type, seed: int):
    """A small model of `config_type` with vLLM-servable shapes (head size 64), untied head, eos off."""
    from transformers import AutoModelForCausalLM

    config = config_type(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                         tie_word_embeddings=False, initializer_range=0.2)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.generation_config.eos_token_id = None
    return model


def tiny_qwen2(seed: int = 0):
    """A small Qwen2 (q/k/v biases, untied head) that vLLM's CPU attention serves (head size 64)."""
    from transformers import Qwen2Config

    return _tiny(Qwen2Config, seed)


def tiny_llama(seed: int = 0):
    """A small Llama (head size 64) whose word-level test tokenizer AutoTokenizer reads as saved (for a Qwen2
    config it would build Qwen2's own tokenizer class, which reads no word-level vocabulary)."""
    from transformers import LlamaConfig

    return _tiny(LlamaConfig, seed)


def fine_tune(model, seed: int = 1):
    """The same model with its last layer's MLP changed: a fine-tune that shares every other tensor."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.model.layers[-1].mlp.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return model


def checkpoint_pair(model, directory: Path) -> tuple[Path, Path]:
    """`model` as a Hugging Face directory (for plain vLLM) and as a Tangram checkpoint (for the backend)."""
    hf = save_hf_dir(model, directory / "hf")
    convert(hf, directory / "ckpt")
    return hf, directory / "ckpt"


def plain_vllm(python: str, jobs: list[dict], workdir: Path) -> list[list[list[int]]]:
    """Plain vLLM's greedy continuations (default loader, files on disk), one engine per job, one process."""
    src, out = workdir / "jobs.json", workdir / "results.json"
    src.write_text(json.dumps(jobs))
    proc = subprocess.run([python, str(REFERENCE), str(src), str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def generate(backend, prompt, n: int, adapter: str | None = None, **params) -> RequestOutput:
    """Submit one greedy request (eos ignored; with LoRA `adapter`) and return its final output."""
    q = OutputQueue()
    backend.submit(prompt, SamplingParams(max_tokens=n, ignore_eos=True, **params), q, arrival=time.perf_counter(),
                   adapter=adapter)
    while True:
        out = q.get(timeout=120)
        if out.finished:
            return out
