"""bench serve end to end with vLLM: Tangram, plain vLLM and Tangram on the vllm backend, on a tiny Llama."""

from __future__ import annotations

import pytest
from rich.console import Console

from serving import CHAT_TEMPLATE
from tangram.bench.serve import ServeSizes, Weights, run_serve_bench
from vllm_models import checkpoint_pair, tiny_llama, vllm_or_fail

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def test_small_run_with_vllm_and_the_vllm_backend(tmp_path):
    from transformers import AutoTokenizer

    python = vllm_or_fail()
    hf, ckpt = checkpoint_pair(tiny_llama(), tmp_path / "llama")
    for d in (hf, ckpt):  # the chats need a template (the checkpoint keeps its own copy of the tokenizer files)
        tok = AutoTokenizer.from_pretrained(d)
        tok.chat_template = CHAT_TEMPLATE
        tok.save_pretrained(d)
    sizes = ServeSizes(concurrency=(1, 16), max_tokens=6, repeats=1, burst=0, warmup_tokens=2, structured=0,
                       vllm_kv_cache_bytes=256 << 20)
    result = run_serve_bench(quick=True, json_path=tmp_path / "s.json", vllm_python=python, progress=False,
                             console=Console(quiet=True), sizes=sizes, weights={"float32": Weights(ckpt, hf)},
                             workdir=tmp_path / "work")
    s = result["summary"]
    assert s["server_errors"] == [] and s["failed"] == 0 and s["lost"] == 0
    assert set(result["config"]["systems"]) == {"tangram", "vllm", "tangram-vllm"}
    for system in ("tangram", "vllm", "tangram-vllm"):
        assert s["tokens_per_s"][system]["float32"]["16"] > 0, system
    assert s["vllm_backend_vs_vllm"] == s["vllm_backend_vs_vllm_by_dtype"]["float32"] > 0
    assert s["vllm_backend_pool_hit_start"] == ["pool-hit"] and s["vllm_backend_pool_hit_bytes_loaded"] == 0
    phase = s["vllm_backend_start_phase"]["float32"]
    assert phase["cold"]["stages"]["start"] == "cold" and phase["cold"]["stages"]["bytes_loaded"] > 0
    assert s["vllm_backend_cold_ttft_s"] > s["vllm_backend_pool_hit_ttft_s"] > 0
    assert s["vllm_default_load_s"] is not None and s["vllm_backend_cold_load_s"] > 0
    assert s["vllm_process_start_s"] > 0 and s["tangram_vllm_process_start_s"] > 0
