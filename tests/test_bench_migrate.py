"""`tangram bench migrate` on a tiny model: every stream migrated, token-identical, and the summary keys."""

from __future__ import annotations

import time

from migration_util import long_context_checkpoint
from tangram.bench.migrate import run_migrate_bench
from tangram.engine import SamplingParams

KEYS = {"tokens_lost", "tokens_duplicated", "outputs_identical", "pause_ms_p50", "pause_ms_p95", "normal_gap_ms_p50",
        "normal_gap_ms_p95", "migration_bytes_per_request"}


def test_bench_migrate_moves_every_stream_unchanged(tmp_path, monkeypatch):
    from tangram.engine.runner import ModelRunner

    real = ModelRunner.run

    def slow(self, plan):  # a step as long as a small real model's: each move's rounds converge mid-stream
        time.sleep(0.004)
        return real(self, plan)

    monkeypatch.setattr(ModelRunner, "run", slow)
    ckpt = long_context_checkpoint(tmp_path / "m")
    cases = [("greedy", 240, SamplingParams(max_tokens=240, ignore_eos=True)),
             ("seeded", 240, SamplingParams(max_tokens=240, ignore_eos=True, temperature=0.8, seed=3))]
    result = run_migrate_bench(quick=True, json_path=tmp_path / "r.json", checkpoint=ckpt, cases=cases,
                               ray_nodes=False, prompt=[5, 17, 33, 90])
    s = result["summary"]
    assert KEYS <= set(s) and (tmp_path / "r.json").is_file()
    assert s["migrated"] == 2 and s["outputs_identical"] == 1.0
    assert s["tokens_lost"] == s["tokens_duplicated"] == 0 and s["migration_bytes_per_request"] > 0
    assert all(r["pause_ms"] is not None and r["normal_gap_ms"] is not None for r in result["rows"])
