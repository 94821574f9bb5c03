"""Per-request records and the metrics of one load point, with the definitions of SGLang's bench_serving
and `vllm bench serve`:

- duration: from the point's start until its last request ended;
- request throughput = completed requests / duration; input (output) token throughput = the completed
  requests' prompt (generated) tokens / duration;
- TTFT = arrival of the first streamed token − the request's send time;
- ITL: every gap between consecutive streamed chunks of a request (a chunk carrying k tokens is one gap),
  pooled over all requests;
- TPOT per request = (E2E − TTFT) / (output tokens − the tokens of the first chunk), only for requests with
  tokens after their first chunk (= bench_serving's (E2E − TTFT) / (output tokens − 1) when the first chunk
  holds one token; aiperf's ITL with --per-chunk-usage);
- E2E = arrival of the final response − send time;
- goodput = completed requests meeting every given SLO (TTFT ≤ --slo-ttft-ms, TPOT ≤ --slo-tpot-ms; a request
  with no token after its first chunk has no TPOT and meets that SLO) / duration;
- mean concurrency = Σ E2E / duration;
- percentiles interpolate linearly between order statistics (numpy's default, as both tools do).

Failed requests count under their gRPC status name and are left out of every latency and throughput
figure; requests cut by the point's time bound count as `cut`, not as errors.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

OK = "OK"
CUT = "CUT"  # still running when the point's time bound ran out; cancelled by the client
PERCENTILES = (50, 90, 99)


@dataclass(slots=True)
class RequestRecord:
    """What the client saw of one request (perf_counter seconds) and what the router reported."""

    start_s: float
    end_s: float = 0.0
    chunk_times_s: list[float] = field(default_factory=list)  # arrival of each chunk that carried tokens
    chunk_tokens: list[int] = field(default_factory=list)  # tokens in that chunk
    status: str = OK  # OK, CUT, or the gRPC status name of the failure
    error: str = ""
    input_tokens: int = 0
    output_tokens: int = 0
    finish_reason: str = ""
    # the router's own numbers from GenerateComplete (fields ≥ 1000), milliseconds and bytes
    queue_ms: float | None = None
    prefill_ms: float | None = None
    transfer_ms: float | None = None
    server_ttft_ms: float | None = None
    transfer_bytes: int | None = None
    cached_tokens: int = 0  # prompt tokens the server took from its prefix cache
    spec_draft_tokens: int = 0  # speculative decoding: draft tokens the server verified, and accepted
    spec_accepted_tokens: int = 0
    output_ids: list[int] = field(default_factory=list)  # from GenerateComplete
    conversation: int | None = None  # multi-turn: which conversation, and its turn (1-based)
    turn: int | None = None

    @property
    def ttft_s(self) -> float:
        return (self.chunk_times_s[0] if self.chunk_times_s else self.end_s) - self.start_s

    @property
    def e2e_s(self) -> float:
        return self.end_s - self.start_s

    @property
    def tpot_s(self) -> float | None:
        """(E2E − TTFT) ÷ the tokens that came after the first chunk (None when there are none): the first
        chunk can carry several tokens (decode steps that finished before the first token reached the router,
        or a client that read slower than they came), and dividing by output − 1 would count those as if
        they had taken decode time after TTFT."""
        after_first = self.output_tokens - (self.chunk_tokens[0] if self.chunk_tokens else 1)
        if after_first < 1:
            return None
        return (self.e2e_s - self.ttft_s) / after_first

    @property
    def itls_s(self) -> list[float]:
        return np.diff(self.chunk_times_s).tolist()


def stats_ms(values_s: list[float]) -> dict:
    """mean, p50, p90, p99 in milliseconds (None for an empty list)."""
    return stats([v * 1e3 for v in values_s])


def stats(values: list[float]) -> dict:
    if not values:
        return {"mean": None, **{f"p{q}": None for q in PERCENTILES}}
    arr = np.asarray(values, dtype=np.float64)
    return {"mean": float(arr.mean()), **{f"p{q}": float(np.percentile(arr, q)) for q in PERCENTILES}}


def meets_slos(r: RequestRecord, slo_ttft_ms: float | None, slo_tpot_ms: float | None) -> bool:
    if slo_ttft_ms is not None and r.ttft_s * 1e3 > slo_ttft_ms:
        return False
    tpot = r.tpot_s
    return slo_tpot_ms is None or tpot is None or tpot * 1e3 <= slo_tpot_ms


def summarize(records: list[RequestRecord], duration_s: float, not_sent: int = 0,
              slo_ttft_ms: float | None = None, slo_tpot_ms: float | None = None) -> dict:
    """The metrics of one point (see the module docstring); JSON-ready."""
    ok = [r for r in records if r.status == OK]
    errors = Counter(r.status for r in records if r.status not in (OK, CUT))
    duration_s = max(duration_s, 1e-9)
    input_tokens = sum(r.input_tokens for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    out = {
        "sent": len(records), "completed": len(ok), "errors": dict(sorted(errors.items())),
        "cut": sum(r.status == CUT for r in records), "not_sent": not_sent, "duration_s": duration_s,
        "total_input_tokens": input_tokens, "total_output_tokens": output_tokens,
        "request_throughput": len(ok) / duration_s, "input_throughput": input_tokens / duration_s,
        "output_throughput": output_tokens / duration_s,
        "total_token_throughput": (input_tokens + output_tokens) / duration_s,
        "mean_concurrency": sum(r.e2e_s for r in ok) / duration_s,
        "ttft_ms": stats_ms([r.ttft_s for r in ok]),
        "tpot_ms": stats_ms([t for r in ok if (t := r.tpot_s) is not None]),
        "itl_ms": stats_ms([gap for r in ok for gap in r.itls_s]),
        "e2e_ms": stats_ms([r.e2e_s for r in ok]),
        "tokens_per_chunk": stats([t for r in ok for t in r.chunk_tokens])["mean"],
        "slo": {"ttft_ms": slo_ttft_ms, "tpot_ms": slo_tpot_ms},
        "goodput": None, "good_requests": None, "router": router_summary(ok),
        "speculative": speculative_summary(ok),
    }
    if slo_ttft_ms is not None or slo_tpot_ms is not None:
        good = sum(meets_slos(r, slo_ttft_ms, slo_tpot_ms) for r in ok)
        out["good_requests"], out["goodput"] = good, good / duration_s
    return out


def router_summary(ok: list[RequestRecord]) -> dict:
    """The router's per-request timings and the prefill→decode state transfer (0 bytes when colocated)."""
    nums = {name: [v for r in ok if (v := getattr(r, name)) is not None]
            for name in ("queue_ms", "prefill_ms", "transfer_ms", "server_ttft_ms")}
    sizes = [r.transfer_bytes for r in ok if r.transfer_bytes is not None]
    total_ms = sum(nums["transfer_ms"])
    return {**{name: stats(values) for name, values in nums.items()},
            "transfer_bytes_mean": float(np.mean(sizes)) if sizes else None,
            "transfer_bytes_total": int(sum(sizes)),
            "transfer_gb_per_s": sum(sizes) / (total_ms / 1e3) / 1e9 if total_ms > 0 else None}


def speculative_summary(ok: list[RequestRecord]) -> dict:
    """Speculative decoding as the completed requests report it (GenerateComplete's spec_draft_tokens and
    spec_accepted_tokens): draft tokens verified, accepted, and the acceptance rate = Σ accepted ÷ Σ drafted
    (None when nothing was drafted: speculation off)."""
    drafted = sum(r.spec_draft_tokens for r in ok)
    accepted = sum(r.spec_accepted_tokens for r in ok)
    return {"draft_tokens": drafted, "accepted_tokens": accepted,
            "accept_rate": accepted / drafted if drafted else None}


def cache_summary(ok: list[RequestRecord]) -> dict:
    """The prefix cache as the completed requests saw it: prompt tokens, the part the server took from its
    cache (`cached_tokens` of GenerateComplete), hit rate = Σ cached ÷ Σ prompt tokens, and the prompt tokens
    the prefill computed (Σ prompt − cached)."""
    prompt = sum(r.input_tokens for r in ok)
    cached = sum(r.cached_tokens for r in ok)
    return {"prompt_tokens": prompt, "cached_tokens": cached,
            "prompt_tokens_mean": prompt / len(ok) if ok else None,
            "cached_tokens_mean": cached / len(ok) if ok else None,
            "hit_rate": cached / prompt if prompt else None, "prefill_tokens": prompt - cached}


def turn_summary(records: list[RequestRecord], turns: int = 0) -> list[dict]:
    """One entry per turn (1 .. the larger of `turns` and the last turn seen; a turn nothing reached has zero
    counts): requests sent, completed, failed and cut, TTFT and E2E of the completed ones, and their prefix
    cache figures (`cache_summary`). Records without a turn are left out."""
    last = max([turns, *(r.turn for r in records if r.turn is not None)])
    out = []
    for turn in range(1, last + 1):
        mine = [r for r in records if r.turn == turn]
        ok = [r for r in mine if r.status == OK]
        out.append({"turn": turn, "sent": len(mine), "completed": len(ok),
                    "failed": sum(r.status not in (OK, CUT) for r in mine), "cut": sum(r.status == CUT for r in mine),
                    "ttft_ms": stats_ms([r.ttft_s for r in ok]), "e2e_ms": stats_ms([r.e2e_s for r in ok]),
                    **cache_summary(ok)})
    return out
