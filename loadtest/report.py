"""What a load test leaves behind: a table row per point on stdout, and one JSONL record per point (when,
which commit, which device and preset, the config and every metric) appended to the results file."""

from __future__ import annotations

import datetime
import json
import math
import os
import shutil
import subprocess
from pathlib import Path

from sparsepd.loadtest.config import LoadTestConfig

SCHEMA_VERSION = 1
REPO = Path(__file__).resolve().parents[1]

# (header, width, value from a point's metrics)
COLUMNS = [
    ("conc", 5, lambda c, m: "inf" if c is None else str(c)),
    ("sent", 5, lambda c, m: str(m["sent"])),
    ("ok", 5, lambda c, m: str(m["completed"])),
    ("err", 4, lambda c, m: str(sum(m["errors"].values()))),
    ("cut", 4, lambda c, m: str(m["cut"])),
    ("req/s", 8, lambda c, m: f"{m['request_throughput']:.2f}"),
    ("in tok/s", 10, lambda c, m: f"{m['input_throughput']:.0f}"),
    ("out tok/s", 10, lambda c, m: f"{m['output_throughput']:.1f}"),
    ("TTFT p50", 9, lambda c, m: _one_decimal(m["ttft_ms"]["p50"])),
    ("p99", 8, lambda c, m: _one_decimal(m["ttft_ms"]["p99"])),
    ("TPOT p50", 9, lambda c, m: _one_decimal(m["tpot_ms"]["p50"])),
    ("p99", 8, lambda c, m: _one_decimal(m["tpot_ms"]["p99"])),
    ("ITL p50", 8, lambda c, m: _one_decimal(m["itl_ms"]["p50"])),
    ("p99", 8, lambda c, m: _one_decimal(m["itl_ms"]["p99"])),
    ("E2E p50", 9, lambda c, m: _one_decimal(m["e2e_ms"]["p50"])),
    ("p99", 9, lambda c, m: _one_decimal(m["e2e_ms"]["p99"])),
    ("goodput", 8, lambda c, m: "-" if m["goodput"] is None else f"{m['goodput']:.2f}"),
    ("xfer KB", 8, lambda c, m: _kb(m["router"]["transfer_bytes_mean"])),
    ("xfer ms", 8, lambda c, m: _one_decimal(m["router"]["transfer_ms"]["p50"])),
    ("accept", 6, lambda c, m: _share(m.get("speculative", {}).get("accept_rate"))),
]
UNITS = "latencies in ms (p50 and p99); goodput in req/s meeting the SLOs; xfer = the router's P→D state " \
        "transfer per request (mean KB, p50 ms); accept = speculative decoding's accepted ÷ drafted tokens"


def _one_decimal(value: float | None) -> str:
    """A latency in ms or a mean token count, "-" when there is none."""
    return "-" if value is None else f"{value:.1f}"


def _kb(value: float | None) -> str:
    return "-" if value is None else f"{value / 1e3:.0f}"


def _line(cells: list[tuple[str, int]]) -> str:
    """Cells (text, width), right-aligned, two spaces apart: every table here."""
    return "  ".join(f"{text:>{width}}" for text, width in cells)


def table_header() -> str:
    return _line([(name, width) for name, width, _ in COLUMNS])


def table_row(concurrency: int | None, metrics: dict) -> str:
    return _line([(value(concurrency, metrics), width) for _, width, value in COLUMNS])


# (header, width, value from one entry of metrics["turns"])
TURN_COLUMNS = [
    ("turn", 4, lambda t: str(t["turn"])),
    ("sent", 5, lambda t: str(t["sent"])),
    ("ok", 5, lambda t: str(t["completed"])),
    ("TTFT p50", 9, lambda t: _one_decimal(t["ttft_ms"]["p50"])),
    ("p90", 8, lambda t: _one_decimal(t["ttft_ms"]["p90"])),
    ("p99", 8, lambda t: _one_decimal(t["ttft_ms"]["p99"])),
    ("E2E p50", 9, lambda t: _one_decimal(t["e2e_ms"]["p50"])),
    ("prompt", 8, lambda t: _one_decimal(t["prompt_tokens_mean"])),
    ("cached", 8, lambda t: _one_decimal(t["cached_tokens_mean"])),
    ("hit rate", 8, lambda t: _share(t["hit_rate"])),
    ("prefill tok", 11, lambda t: str(t["prefill_tokens"])),
]
TURN_UNITS = "per turn: TTFT and E2E in ms; prompt and cached = mean tokens per completed request; hit rate = " \
             "Σ cached ÷ Σ prompt tokens; prefill tok = Σ (prompt − cached), the prompt tokens computed"


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def turn_table(turns: list[dict]) -> list[str]:
    """The per-turn table of a multi-turn run: a header line, then a row per turn."""
    return [_line([(name, width) for name, width, _ in TURN_COLUMNS]),
            *(_line([(value(t), width) for _, width, value in TURN_COLUMNS]) for t in turns)]


def multi_turn_lines(metrics: dict) -> list[str]:
    """What a multi-turn run adds below its table row: the per-turn table, the prefix cache over the whole
    run, and how the conversations ended (those stopped early at the context length named)."""
    cache, conv = metrics["prefix_cache"], metrics["conversations"]
    ended = ", ".join(f"{n} {why}" for why, n in conv["ended"].items() if n)
    lines = [f"# {TURN_UNITS}", *turn_table(metrics["turns"]),
             f"# overall: hit rate {_share(cache['hit_rate'])} ({cache['cached_tokens']} of {cache['prompt_tokens']} "
             f"prompt tokens cached), {cache['prefill_tokens']} prefill tokens computed, "
             f"{metrics['output_throughput']:.1f} output tokens/s",
             f"# conversations: {conv['count']}, ended: {ended or 'none'}"]
    if conv["ended"]["context"]:
        at = ", ".join(f"{n} before turn {turn}" for turn, n in conv["context_stop_turns"].items())
        lines.append(f"# stopped early at the context length: {conv['ended']['context']} conversations ({at}), "
                     f"{conv['turns_not_sent']['context']} turns not sent")
    return lines


def git_commit() -> tuple[str | None, bool | None]:
    """(commit, whether tracked files differ from it); SPARSEPD_GIT_COMMIT overrides where there is no .git."""
    if os.environ.get("SPARSEPD_GIT_COMMIT"):
        return os.environ["SPARSEPD_GIT_COMMIT"], None
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None, None
    if head.returncode != 0:
        return None, None
    return head.stdout.strip(), bool(dirty.stdout.strip()) if dirty.returncode == 0 else None


def host_device() -> str:
    """This host's GPU names (nvidia-smi), or "cpu" where there is none; the load test runs beside the server
    when it launches it, so this is the server's device then."""
    if os.environ.get("SPARSEPD_DEVICE_NAME"):
        return os.environ["SPARSEPD_DEVICE_NAME"]
    exe = shutil.which("nvidia-smi")
    if exe:
        try:
            out = subprocess.run([exe, "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True,
                                 timeout=20)
            names = sorted({line.strip() for line in out.stdout.splitlines() if line.strip()})
            if out.returncode == 0 and names:
                return ", ".join(names)
        except (OSError, subprocess.TimeoutExpired):
            pass
    return "cpu"


def point_record(cfg: LoadTestConfig, run: dict, concurrency: int | None, num_prompts: int, metrics: dict) -> dict:
    """One JSONL line. `run` holds what is the same for every point of the invocation (see `run_facts`)."""
    config = {
        "concurrency": concurrency, "request_rate": None if math.isinf(cfg.request_rate) else cfg.request_rate,
        "num_prompts": num_prompts, "input_len": [cfg.input_len.low, cfg.input_len.high],
        "output_len": [cfg.output_len.low, cfg.output_len.high], "dataset": cfg.dataset, "seed": cfg.seed,
        "temperature": cfg.temperature, "stop_token_ids": list(cfg.stop_token_ids), "max_seconds": cfg.max_seconds,
        "drain_seconds": cfg.drain_seconds, "request_timeout_s": cfg.request_timeout_s,
        "warmup_requests": cfg.warmup_requests,
        "slo_ttft_ms": cfg.slo_ttft_ms, "slo_tpot_ms": cfg.slo_tpot_ms,
    }
    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    return {"schema": SCHEMA_VERSION, "timestamp": now, **run, "config": config, "metrics": metrics}


def multi_turn_record(cfg: LoadTestConfig, run: dict, concurrency: int | None, metrics: dict) -> dict:
    """The JSONL line of a multi-turn run: `point_record`'s, its config naming the workload, no input_len
    (prompts grow turn by turn) and num_prompts the requests of conversations × turns."""
    spec = cfg.multi_turn
    record = point_record(cfg, run, concurrency, spec.requests, metrics)
    record["config"].update(workload="multi-turn", input_len=None, conversations=spec.conversations,
                            turns=spec.turns, system_len=spec.system_len, user_len=spec.user_len)
    return record


def run_facts(cfg: LoadTestConfig, run_id: str, address: str, preset: str | None, model: str,
              workers: dict[str, int]) -> dict:
    commit, dirty = git_commit()
    return {"run_id": run_id, "label": cfg.label, "git_commit": commit, "git_dirty": dirty,
            "device": host_device(), "preset": preset, "model": model,
            "server": {"address": address, "workers": workers, "launched": cfg.launch,
                       "serve_args": list(cfg.serve_args) if cfg.launch else None}}


def append_jsonl(path: str, record: dict) -> None:
    file = Path(path)
    file.parent.mkdir(parents=True, exist_ok=True)
    with file.open("a") as f:
        f.write(json.dumps(record, allow_nan=False) + "\n")


def read_jsonl(path: str) -> list[dict]:
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"results file {path!r} does not exist")
    records = []
    for number, line in enumerate(file.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except ValueError as exc:
                raise ValueError(f"{path}:{number}: not JSON ({exc})") from None
    return records
