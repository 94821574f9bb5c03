"""Charts of sweeps from their JSONL records (matplotlib, PNG): throughput vs concurrency, and TTFT/TPOT
p50 (solid) and p99 (dashed) vs output throughput; one series per label, so PD and colocated runs overlay.
A label that was run several times is drawn from its latest run."""

from __future__ import annotations

from pathlib import Path

PLOT_INSTALL = "pip install 'sparsepd[plot]'"


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError(f"plots need matplotlib, which is not installed: {PLOT_INSTALL}") from None


def series(records: list[dict], labels: list[str] | None = None) -> dict[str, list[dict]]:
    """label → the points of its latest run, by concurrency."""
    latest: dict[str, tuple[str, str]] = {}  # label → (timestamp, run_id) of its newest record
    for r in records:
        name = series_name(r)
        if labels and name not in labels:
            continue
        key = (r.get("timestamp", ""), r.get("run_id", ""))
        if name not in latest or key > latest[name]:
            latest[name] = key
    out = {name: [r for r in records if series_name(r) == name and r.get("run_id", "") == run_id]
           for name, (_, run_id) in latest.items()}
    return {name: sorted(points, key=_x) for name, points in sorted(out.items())}


def series_name(record: dict) -> str:
    if record.get("label"):
        return record["label"]
    workers = (record.get("server") or {}).get("workers") or {}
    return f"{record.get('preset') or 'model'} " + "+".join(f"{n} {role}" for role, n in sorted(workers.items()))


def _x(record: dict) -> int:
    return record["config"]["concurrency"] or record["config"]["num_prompts"]


def draw(records: list[dict], prefix: str, labels: list[str] | None = None) -> list[Path]:
    """Write PREFIX_throughput.png and PREFIX_latency.png; returns their paths."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    lines = series(records, labels)
    if not lines:
        raise ValueError(f"no records to plot{f' with labels {labels}' if labels else ''}")
    title = _title(next(iter(lines.values()))[0])
    paths = [Path(f"{prefix}_throughput.png"), Path(f"{prefix}_latency.png")]
    paths[0].parent.mkdir(parents=True, exist_ok=True)

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, points in lines.items():
        xs = [_x(p) for p in points]
        axes[0].plot(xs, [p["metrics"]["output_throughput"] for p in points], "o-", label=name)
        axes[1].plot(xs, [p["metrics"]["request_throughput"] for p in points], "o-", label=name)
    concurrencies = sorted({_x(p) for points in lines.values() for p in points})
    for ax, what in zip(axes, ("output tokens/s", "requests/s"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xticks(concurrencies, [str(c) for c in concurrencies])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel("max concurrency")
        ax.set_ylabel(what)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(f"throughput vs concurrency — {title}")
    fig.tight_layout()
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (name, points) in enumerate(lines.items()):
        xs = [p["metrics"]["output_throughput"] for p in points]
        color = f"C{i}"
        for ax, metric in zip(axes, ("ttft_ms", "tpot_ms"), strict=True):
            for q, style in (("p50", "o-"), ("p99", "s--")):
                ys = [p["metrics"][metric][q] for p in points]
                ax.plot(xs, [float("nan") if y is None else y for y in ys], style, color=color, label=f"{name} {q}")
    for ax, what in zip(axes, ("TTFT (ms)", "TPOT (ms)"), strict=True):
        ax.set_xlabel("output tokens/s")
        ax.set_ylabel(what)
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"latency vs throughput — {title}")
    fig.tight_layout()
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)
    return paths


def _title(record: dict) -> str:
    c = record["config"]
    if c.get("workload") == "multi-turn":
        inputs = (f"{c['conversations']} conversations × {c['turns']} turns, system {c['system_len']} + "
                  f"user {c['user_len']}")
    elif c.get("dataset"):
        inputs = f"prompts of {Path(c['dataset']).name}"
    else:
        inputs = f"input {_span(c['input_len'])}"
    return f"{record.get('preset')} on {record.get('device')}, {inputs}, output {_span(c['output_len'])} tokens"


def _span(low_high: list[int]) -> str:
    return "-".join(str(v) for v in sorted(set(low_high)))
