"""The migration trace of `tangram bench coldstart`: where live migration can make room for a start (issue 18).

On the main trace the migration policy never fires (docs/migration.md says
why: one instance per model, streams of 8-16 tokens). This trace is the case
the policy is for: a popular model serves long streams on both devices (up to
two instances, each device's pool holding one model with its KV), and in
every wave one request for another model arrives while both devices are busy.
Without migration the start drains one instance of the popular model and
waits until its longest stream ends; with it (`tangram-migrate`) the drained
instance's streams move to the other instance and the start begins at once.
Both configurations replay the same seeded trace (`coldstart_replay`); every
stream's text is compared between them (greedy, float32).
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

from tangram.bench.coldstart_replay import MAX_BATCH, run_config
from tangram.bench.coldstart_workload import Configuration, Sizes
from tangram.bench.kv_workload import ModelPaths, TraceRequest
from tangram.control import Deployment
from tangram.engine import EngineConfig
from tangram.workload import percentile

MIGRATE_CONFIGS = ("tangram", "tangram-migrate")


@dataclass(frozen=True)
class MigrateTrace:
    """Shape of the migration trace: `waves` of `long_requests` streams of the popular `long_model`, and
    `short_after_s` into each wave one short request for the next of `short_models`."""

    long_model: str
    short_models: tuple[str, ...]
    waves: int
    wave_gap_s: float
    long_requests: int = 8
    long_tokens: int = 256
    short_after_s: float = 1.0
    short_tokens: int = 8
    prompt_tokens: int = 32
    long_keep_alive_s: float = 60.0  # the popular model stays up between waves
    short_keep_alive_s: float = 1.0  # the others scale to zero between waves

    @property
    def max_model_len(self) -> int:
        """Context of every deployment: the prompt and the longest stream."""
        return self.prompt_tokens + max(self.long_tokens, self.short_tokens)


QUICK_MIGRATE = MigrateTrace("solo-a", ("solo-b", "fam-base"), waves=3, wave_gap_s=9.0)
FULL_MIGRATE = MigrateTrace("solo-a", ("solo-b", "fam-base", "fam-chat"), waves=5, wave_gap_s=15.0)  # streams take 9-12 s


def migrate_trace(spec: MigrateTrace, vocab: dict[str, int], seed: int) -> list[TraceRequest]:
    """The seeded trace, in arrival order (pure)."""
    rng = random.Random(seed)

    def prompt(model: str) -> tuple[int, ...]:
        return tuple(rng.randrange(3, vocab[model]) for _ in range(spec.prompt_tokens))

    out = []
    for w in range(spec.waves):
        t0 = w * spec.wave_gap_s
        out += [TraceRequest(round(t0 + 0.05 * i, 3), spec.long_model, prompt(spec.long_model), spec.long_tokens)
                for i in range(spec.long_requests)]
        short = spec.short_models[w % len(spec.short_models)]
        out.append(TraceRequest(t0 + spec.short_after_s, short, prompt(short), spec.short_tokens))
    return sorted(out, key=lambda r: r.t)


def migrate_capacity(sizes_of: dict[str, int], spec: MigrateTrace, kv_bytes_per_token: int) -> int:
    """Per-device pool bytes: the largest model of the trace with its streams' KV (twice over: the streams of
    both instances after a migration) and an eighth more, never two models at once."""
    names = (spec.long_model, *spec.short_models)
    biggest = max(sizes_of[n] for n in names)
    kv = 2 * spec.long_requests * spec.max_model_len * kv_bytes_per_token
    capacity = biggest + kv + biggest // 8 + (1 << 20)
    smallest_pair = sum(sorted(sizes_of[n] for n in names)[:2])
    if capacity >= smallest_pair:
        raise ValueError(f"the migration trace's models are too small for their KV: a pool of {capacity} bytes "
                         f"would hold two of them ({smallest_pair} bytes)")
    return capacity


def migrate_deployments(cfg: Configuration, spec: MigrateTrace, paths: dict[str, ModelPaths]) -> list[Deployment]:
    """The popular model up to two instances (scaling out past half its streams), the others one each."""
    engine = EngineConfig(kv_mode=cfg.kv_mode, templates=cfg.templates, max_model_len=spec.max_model_len,
                          max_batch=MAX_BATCH)
    per_instance = max(1, spec.long_requests // 2)
    deps = [Deployment(name=spec.long_model, checkpoint=str(paths[spec.long_model].ckpt), engine=engine,
                       keep_alive_s=spec.long_keep_alive_s, max_instances=2, target_concurrency=per_instance)]
    deps += [Deployment(name=n, checkpoint=str(paths[n].ckpt), engine=engine, keep_alive_s=spec.short_keep_alive_s)
             for n in dict.fromkeys(spec.short_models)]
    return deps


def summarize_migrate(per_config: dict[str, dict], spec: MigrateTrace) -> dict:
    """The `migrate_trace` summary (pure): TTFT percentiles overall and of the short requests, failures,
    the controller's migrations and drains, and how many streams are the same text in every configuration."""
    s: dict = {k: {} for k in ("ttft_p50", "ttft_p95", "short_ttft_p50", "short_ttft_max", "long_ttft_p95",
                               "failed", "migrations", "drains")}
    for name, run in per_config.items():
        ok = [r for r in run["results"] if r.get("ttft_s") is not None and not r.get("error")]
        short = [r["ttft_s"] for r in ok if r["model"] != spec.long_model]
        s["ttft_p50"][name] = percentile([r["ttft_s"] for r in ok], 50)
        s["ttft_p95"][name] = percentile([r["ttft_s"] for r in ok], 95)
        s["short_ttft_p50"][name] = percentile(short, 50)
        s["short_ttft_max"][name] = max(short, default=None)
        s["long_ttft_p95"][name] = percentile([r["ttft_s"] for r in ok if r["model"] == spec.long_model], 95)
        s["failed"][name] = len(run["results"]) - len(ok)
        s["migrations"][name] = run["events"].get("migrate", 0)
        s["drains"][name] = run["events"].get("drain", 0)
    runs = [run["results"] for run in per_config.values()]
    same = [len({r[i]["text"] for r in runs}) == 1 and not any(r[i].get("error") for r in runs)
            for i in range(min(map(len, runs), default=0))]
    s["outputs_identical"] = sum(same) / len(same) if same else None
    a, b = s["ttft_p95"].get("tangram"), s["ttft_p95"].get("tangram-migrate")
    s["ttft_p95_reduction"] = 1 - b / a if a and b is not None else None
    return s


def migrate_section(configs: dict[str, Configuration], paths: dict[str, ModelPaths], spec: MigrateTrace,
                    sizes_of: dict[str, int], vocab: dict[str, int], kv_bytes_per_token: int, seed: int,
                    bar) -> tuple[list[dict], dict, dict]:
    """Replay the migration trace on two devices under each configuration; rows, summary, config facts."""
    trace = migrate_trace(spec, vocab, seed)
    capacity = migrate_capacity(sizes_of, spec, kv_bytes_per_token)
    sizes = Sizes("migrate", len(trace), spec.wave_gap_s, spec.short_keep_alive_s, spec.prompt_tokens,
                  spec.long_tokens, 0.0, 2)
    per_config: dict[str, dict] = {}
    for name in MIGRATE_CONFIGS:
        bar.describe(f"migration trace: {name}")
        cfg = configs[name]
        per_config[name] = run_config(cfg, paths, trace, sizes, capacity, migrate_deployments(cfg, spec, paths),
                                      warm_repeats=0)
        bar.advance()
    rows = [{"section": "migrate", "config": n, **r} for n, run in per_config.items() for r in run["results"]]
    facts = {"spec": asdict(spec), "pool_capacity": capacity, "requests": len(trace),
             "events": {n: r["events"] for n, r in per_config.items()},
             "replay_s": {n: r["replay_s"] for n, r in per_config.items()}}
    return rows, summarize_migrate(per_config, spec), facts


__all__ = ["FULL_MIGRATE", "MIGRATE_CONFIGS", "MigrateTrace", "QUICK_MIGRATE", "migrate_capacity",
           "migrate_deployments", "migrate_section", "migrate_trace", "summarize_migrate"]
