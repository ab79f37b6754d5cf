"""`tangram bench lora` on a tiny base: the summary keys, every load checked equal to PEFT's, the mixed batch."""

from __future__ import annotations

import pytest

from tangram.bench.lora import Sizes, run_lora_bench
from tangram.workload import ModelSpec

pytest.importorskip("peft")

TINY = ModelSpec("tiny-lora-base", "Qwen2Config", dict(
    hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
    vocab_size=512, max_position_embeddings=256, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
    pad_token_id=0), "float32", seed=5)
SMALL = Sizes("small", adapters=3, rank=4, timed=2, pool_hits=3, big_rank=16, requests=4, batch_adapters=2,
              prompt_tokens=6, max_tokens=4, repeats=1, big_repeats=2)


def test_bench_lora_tiny(tmp_path, monkeypatch):
    import tangram.bench.lora as bench_lora

    asked: list[list] = []  # the read-speed probe runs before the timed loads, on what they read
    monkeypatch.setattr(bench_lora, "measure_pending", lambda paths: asked.append(list(paths)) or [])
    result = run_lora_bench(quick=True, json_path=tmp_path / "lora.json", workdir=tmp_path / "work", spec=TINY,
                            sizes=SMALL)
    summary = result["summary"]
    assert sorted(summary) == sorted(["adapter_load_speedup_vs_peft", "adapter_cold_load_s", "adapter_pool_hit_ms",
                                      "mixed_batch_tokens_per_s_vs_base", "vllm_backend_adapter_load_s",
                                      "vllm_adapter_load_s", "vllm_backend_adapter_load_speedup",
                                      "vllm_backend_adapter_pool_hit_ms"])  # vLLM rows: `make test` installs vLLM
    assert all(v is not None and v > 0 for v in summary.values())
    vllm = result["config"]["vllm"]
    assert vllm["greedy_equal"] and len(vllm["rows"]) == 2 and vllm["dtype"] == "bfloat16"
    for r in vllm["rows"]:  # the cold bind's two parts are each measured and fit inside it
        assert 0 < r["tangram_vllm_cold_pool_s"] and 0 < r["tangram_vllm_cold_shell_s"]
        assert r["tangram_vllm_cold_pool_s"] + r["tangram_vllm_cold_shell_s"] <= r["tangram_vllm_cold_s"]
    rows = result["rows"]
    assert [r["rank"] for r in rows] == [4, 4, 16] and all(r["equal"] and r["modules"] == 14 for r in rows)
    assert [r["repeats"] for r in rows] == [1, 1, 2] and len(rows[-1]["tangram_cold_runs_s"]) == 2
    assert len(rows[-1]["peft_cold_runs_s"]) == 2
    mixed = result["config"]["mixed_batch"]
    assert mixed["outputs_equal_one_adapter_per_batch"] == 4 and mixed["outputs_differ_from_base"] >= 1
    assert (tmp_path / "lora.json").is_file()
    assert len(asked) == 1 and {p.name for p in asked[0][1:]} == {"r4-0", "r16-0"}
    assert result["config"]["read_probe_before_loads"] == []
    assert result["config"]["tangram_hashes_every_read"] is True
