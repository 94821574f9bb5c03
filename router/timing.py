"""The router's own clock on every streamed request (`router --timing-log FILE`): a third measurement beside
the clients', taken where the tokens leave the server, so that a client whose numbers disagree with another's
can be told wrong.

One JSON line per ended request, written when its Generate call returns:

    {"request_id": ..., "arrival_unix_s": 1765000000.123,   # the Generate call reached the servicer
     "status": "OK" | a gRPC status name, "tokens": 32,     # output tokens streamed
     "emit_ms": [64.1, 80.3, ...],                           # each chunk handed to gRPC, ms after arrival
     "chunk_tokens": [1, 1, ...],                            # tokens in that chunk
     "end_ms": 560.2}                                        # the final response (GenerateComplete) handed over

From these, with the clients' definitions (loadtest/metrics.py): TTFT = emit_ms[0], E2E = end_ms, TPOT =
(end_ms − emit_ms[0]) ÷ (tokens − chunk_tokens[0]). `summarize` computes them over a set of lines.
A line costs one small write; without --timing-log nothing is recorded.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(slots=True)
class RequestTiming:
    """One request's server-side times: perf_counter at arrival, and ms after it for each chunk and the end."""

    request_id: str
    arrival_unix_s: float = field(default_factory=time.time)
    arrival_s: float = field(default_factory=time.perf_counter)
    emit_ms: list[float] = field(default_factory=list)
    chunk_tokens: list[int] = field(default_factory=list)
    end_ms: float | None = None
    status: str = "OK"

    def chunk(self, num_tokens: int) -> None:
        self.emit_ms.append((time.perf_counter() - self.arrival_s) * 1e3)
        self.chunk_tokens.append(num_tokens)

    def complete(self) -> None:
        """A final response handed over (n > 1: one per choice; the last one's time stays)."""
        self.end_ms = (time.perf_counter() - self.arrival_s) * 1e3

    def record(self) -> dict:
        return {"request_id": self.request_id, "arrival_unix_s": round(self.arrival_unix_s, 6),
                "status": self.status, "tokens": sum(self.chunk_tokens),
                "emit_ms": [round(t, 3) for t in self.emit_ms], "chunk_tokens": self.chunk_tokens,
                "end_ms": None if self.end_ms is None else round(self.end_ms, 3)}


class TimingLog:
    """Appends one line per ended request to a file (line-buffered: a reader sees whole lines as they end)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - closed by close()

    def start(self, request_id: str) -> RequestTiming:
        return RequestTiming(request_id)

    def write(self, timing: RequestTiming) -> None:
        if not self.file.closed:
            self.file.write(json.dumps(timing.record(), separators=(",", ":")) + "\n")

    def close(self) -> None:
        self.file.close()


def read(path: str | Path, since_unix_s: float = 0.0, until_unix_s: float = float("inf")) -> list[dict]:
    """The lines of requests that arrived in [since, until)."""
    out = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            if since_unix_s <= r["arrival_unix_s"] < until_unix_s:
                out.append(r)
    return out


def summarize(records: list[dict]) -> dict:
    """The server's figures over completed requests, with the load test's definitions (ms; throughput per s
    over first arrival → last end): TTFT, TPOT and E2E means and p50s, output tokens/s."""
    import numpy as np

    ok = [r for r in records if r["status"] == "OK" and r["emit_ms"] and r["end_ms"] is not None]
    if not ok:
        return {"completed": 0}
    ttft = [r["emit_ms"][0] for r in ok]
    e2e = [r["end_ms"] for r in ok]
    tpot = [(r["end_ms"] - r["emit_ms"][0]) / (r["tokens"] - r["chunk_tokens"][0])
            for r in ok if r["tokens"] > r["chunk_tokens"][0]]
    start = min(r["arrival_unix_s"] for r in ok)
    end = max(r["arrival_unix_s"] + r["end_ms"] / 1e3 for r in ok)
    tokens = sum(r["tokens"] for r in ok)

    def mean_p50(values: list[float]) -> tuple[float | None, float | None]:
        return (float(np.mean(values)), float(np.percentile(values, 50))) if values else (None, None)

    (ttft_mean, ttft_p50), (tpot_mean, tpot_p50), (e2e_mean, e2e_p50) = map(mean_p50, (ttft, tpot, e2e))
    return {"completed": len(ok), "out_tok": tokens / len(ok), "out_tok_s": tokens / max(end - start, 1e-9),
            "req_s": len(ok) / max(end - start, 1e-9), "ttft_mean": ttft_mean, "ttft_p50": ttft_p50,
            "tpot_mean": tpot_mean, "tpot_p50": tpot_p50, "e2e_mean": e2e_mean, "e2e_p50": e2e_p50,
            "tok_per_chunk": tokens / sum(len(r["emit_ms"]) for r in ok)}
