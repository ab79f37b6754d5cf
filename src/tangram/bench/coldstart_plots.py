"""Figures of bench coldstart (matplotlib, PNG): TTFT CDF, stage breakdown of starts, pool occupancy."""

from __future__ import annotations

from pathlib import Path

STAGES = ("schedule_s", "queue_s", "init_s", "load_s", "kv_s", "prefill_s")


def write_plots(result: dict, out: Path) -> list[Path]:
    """Write the three figures into `out`; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    rows = [r for r in result["rows"] if r.get("section") == "replay" and r.get("ttft_s") is not None]
    configs = list(dict.fromkeys(r["config"] for r in rows))
    paths = []

    fig, ax = plt.subplots(figsize=(6, 4))
    for c in configs:
        v = sorted(r["ttft_s"] for r in rows if r["config"] == c)
        ax.step(v, [(i + 1) / len(v) for i in range(len(v))], where="post", label=c)
    ax.set_xscale("log")
    ax.set_xlabel("TTFT (s, log)")
    ax.set_ylabel("fraction of requests")
    ax.legend()
    ax.set_title("TTFT through the server")
    paths.append(_save(fig, out / "ttft_cdf.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    bottom = [0.0] * len(configs)
    for stage in STAGES:
        means = []
        for c in configs:
            starts = [r for r in rows if r["config"] == c and r.get("start") in ("pool-hit", "dram", "cold")]
            means.append(sum(r.get(stage) or 0.0 for r in starts) / len(starts) if starts else 0.0)
        ax.bar(configs, means, bottom=bottom, label=stage.removesuffix("_s"))
        bottom = [b + m for b, m in zip(bottom, means)]
    ax.set_ylabel("seconds (mean over requests that waited for a start)")
    ax.legend()
    ax.set_title("where a start's time goes")
    paths.append(_save(fig, out / "start_stages.png"))

    samples = [r for r in result["rows"] if r.get("section") == "pool"]
    pools = list(dict.fromkeys(r["config"] for r in samples))
    fig, axes = plt.subplots(len(pools), 1, figsize=(7, 2.2 * max(1, len(pools))), squeeze=False, sharex=True)
    for ax, c in zip(axes[:, 0], pools):
        s = [r for r in samples if r["config"] == c]
        ax.stackplot([r["t"] for r in s], *[[r[k] / 1e6 for r in s] for k in ("active", "kv", "retained", "free")],
                     labels=("active", "KV", "retained", "free"))
        ax.set_ylabel(f"{c}\nMB")
    axes[0, 0].legend(loc="upper right", fontsize="small")
    axes[-1, 0].set_xlabel("seconds into the trace")
    fig.suptitle("device pool occupancy")
    paths.append(_save(fig, out / "pool_occupancy.png"))
    return paths


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
