"""Helpers of the serving tests: tiny chat-capable models and a server on a loopback port."""

from __future__ import annotations

import contextlib
from pathlib import Path

from conftest import engine_model, save_hf_dir
from tangram.control import Deployment, ServeConfig
from tangram.serve import Server

CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"


def chat_model_dir(directory: Path, arch: str = "llama", seed: int = 0) -> Path:
    """A tiny model directory whose tokenizer has a (trivial) chat template."""
    from transformers import AutoTokenizer

    save_hf_dir(engine_model(arch, seed), directory)
    tok = AutoTokenizer.from_pretrained(directory)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(directory)
    return directory


@contextlib.contextmanager
def serving(deployments: list[Deployment], pool_bytes: int = 64 << 20, **config):
    """A real server (uvicorn, loopback, free port) with these deployments, stopped at exit."""
    cfg = ServeConfig(port=0, pool_capacity=pool_bytes, admin_token="test-token", deployments=deployments, **config)
    with Server(cfg).running() as server:
        yield server
