"""SGLang's metrics (`sglang:*`) of a real `sparsepd serve` (tiny, CPU, 127.0.0.1, free ports) against what its
clients saw: a warm-up request, one streamed request cancelled after its first token, then a load through the
load test's runner (one prompt repeats the warm-up's, so the prefix cache serves part of it). Request, prompt,
generated, cached and aborted counts are exact; every request's TTFT, queue time and end-to-end time lies in
the histogram buckets the router's own numbers (GenerateComplete) and the clients' clocks allow; the transfer
speed and latency and the prefix-cache hit rate of the load's interval equal those computed from the
completions; once idle, every worker's queues, batch and pages read 0 and the throughput falls to 0."""

from __future__ import annotations

import asyncio
import time
import urllib.request

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sparsepd.deploy.launch import start, stop
from sparsepd.loadtest.client import generate_request, open_channel, send, wait_idle
from sparsepd.loadtest.metrics import CUT, OK
from sparsepd.loadtest.runner import PointSettings, Progress, run_point
from sparsepd.loadtest.workload import Prompt
from sparsepd.model_config import get_preset
from sparsepd.proto import sglang_scheduler_pb2 as pb
from sparsepd.proto import sglang_scheduler_pb2_grpc as pb_grpc
from sparsepd.router.sglang_metrics import E2E_BUCKETS_S, TTFT_BUCKETS_S

PAGE = get_preset("tiny").page_size
POLL_S = 0.5  # the router polls every worker's Stats this often (router/workers.py)
SETTLE_S = 5 * POLL_S  # long enough for a poll that starts after the last request to reach the router
CANCELLED_MAX_NEW = 64
LOAD = [(17, 3), (40, 5), (2 * PAGE + 17, 4), (33, 6), (90, 2)]  # (prompt tokens, output tokens)
EPS = 1e-6


@pytest.fixture(scope="module")
def served():
    child = start("serve", ["serve", "--preset", "tiny",
                            "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", "--num-slots", "8",
                            "--num-pages", "128"], timeout_s=240)
    try:
        yield child.ready
    finally:
        code = stop(child, timeout_s=30)
        assert code == 0, "\n".join(child.log_tail)


def _scrape(url: str) -> dict[tuple[str, frozenset], float]:
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _value(samples: dict, name: str, **labels) -> float:
    key = (name, frozenset(labels.items()))
    assert key in samples, f"{name}{labels} is not exported; {sorted(k for k in samples if k[0] == name)}"
    return samples[key]


def _series(samples: dict, name: str) -> dict[str, float]:
    """A scheduler-side gauge or counter: {engine_type: value} (one process of each kind here)."""
    out = {}
    for (n, labels), v in samples.items():
        if n == name:
            labels = dict(labels)
            assert (labels["tp_rank"], labels["pp_rank"]) == ("0", "0")
            assert labels["engine_type"] not in out, f"two {labels['engine_type']} series of {name}"
            out[labels["engine_type"]] = v
    return out


def _buckets(samples: dict, name: str, model: str, **labels) -> dict[float, float]:
    return {float(dict(k)["le"]): v for (n, k), v in samples.items()
            if n == f"{name}_bucket" and dict(k).get("model_name") == model
            and all(dict(k).get(a) == b for a, b in labels.items())}


def _ids(rng: np.random.Generator, n: int, first: int) -> tuple[int, ...]:
    """n token ids starting with `first` (a distinct first id: no two prompts share a cached page by chance)."""
    return (first, *(int(x) for x in rng.integers(0, 250, n - 1)))


async def _run(address: str, metrics_url: str) -> dict:
    rng = np.random.default_rng(35)
    warm = Prompt(_ids(rng, 2 * PAGE + 9, 1), None, 4)
    cancelled = Prompt(_ids(rng, 25, 2), None, CANCELLED_MAX_NEW)
    load = [Prompt(_ids(rng, n, 10 + i), None, out) for i, (n, out) in enumerate(LOAD)]
    load.append(Prompt(warm.input_ids, None, 3))  # the warm-up's prompt again: its pages come from the cache
    records, out = [], {}
    async with open_channel(address) as ch:
        stub = pb_grpc.SglangSchedulerStub(ch)
        out["model"] = (await stub.GetModelInfo(pb.GetModelInfoRequest())).served_model_name
        out["s0"] = _scrape(metrics_url)
        out["warm"] = await send(stub, generate_request(warm, "warm", 0.0, 0), 120, records)

        first_token = asyncio.Event()

        async def watch() -> None:
            while not records[-1].chunk_times_s:
                await asyncio.sleep(0.005)
            first_token.set()

        task = asyncio.create_task(send(stub, generate_request(cancelled, "cancelled", 0.0, 0), 120, records))
        await asyncio.sleep(0)  # send() has appended its record
        out["cancelled"] = records[-1]
        await asyncio.wait_for(watch(), 120)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert await wait_idle(stub, 30)
        out["cancelled_over_at"] = time.perf_counter()  # the router has ended it by now
        await asyncio.sleep(SETTLE_S)
        out["s1"] = _scrape(metrics_url)  # the interval gauges' window of the load starts here

        settings = PointSettings(concurrency=3, max_seconds=120, drain_seconds=60, request_timeout_s=120,
                                 temperature=0.0, seed=1, request_prefix="load")
        result = await run_point(stub, load, np.zeros(len(load)), settings, Progress("metrics", len(load), False))
        out["load"] = result.records
        assert await wait_idle(stub, 30)
        await asyncio.sleep(SETTLE_S)
        out["s2"] = _scrape(metrics_url)
        await asyncio.sleep(SETTLE_S)
        out["s3"] = _scrape(metrics_url)
    out["prompts"] = [warm, cancelled, *load]
    return out


def test_sglang_metrics_match_what_the_clients_saw(served):
    run = asyncio.run(_run(served["grpc"], served["metrics"]))
    model, s0, s2, s3 = run["model"], run["s0"], run["s2"], run["s3"]
    warm, cancelled, load = run["warm"], run["cancelled"], run["load"]
    done = [warm, *load]  # every request that completed
    assert [r.status for r in done] == [OK] * len(done) and cancelled.status == CUT
    prompts = run["prompts"][2:]
    assert sorted((r.input_tokens, r.output_tokens) for r in load) == sorted((len(p.input_ids), p.output_len)
                                                                            for p in prompts)
    got = sum(cancelled.chunk_tokens)  # tokens it received before it went away
    assert got >= 1
    m = {"model_name": model}

    # --- before any request: the counters are there, at 0 ------------------------------------------------
    for name in ("num_requests", "num_aborted_requests", "prompt_tokens", "generation_tokens", "cached_tokens"):
        assert _value(s0, f"sglang:{name}_total", **m) == 0

    # --- counts -------------------------------------------------------------------------------------------
    total = len(done) + 1
    assert _value(s2, "sglang:num_requests_total", **m) == total
    assert _value(s2, "sglang:num_aborted_requests_total", **m) == 1
    assert _value(s2, "sglang:prompt_tokens_total", **m) == sum(len(p.input_ids) for p in run["prompts"])
    generated = _value(s2, "sglang:generation_tokens_total", **m)
    assert sum(r.output_tokens for r in done) + got <= generated <= sum(r.output_tokens for r in done) + (
        CANCELLED_MAX_NEW)
    assert generated == _value(s2, "sparsepd_router_generated_tokens_total")  # ours counts the same tokens
    cached = sum(r.cached_tokens for r in done)
    assert cached == (len(run["prompts"][0].input_ids) - 1) // PAGE * PAGE > 0  # the repeated prompt's pages
    assert _value(s2, "sglang:cached_tokens_total", **m) == cached  # (the cancelled prompt shares no page)

    # --- TTFT: the router's own (GenerateComplete.ttft_ms) in exact buckets; the clients' clocks bound it ----
    ttft = _buckets(s2, "sglang:time_to_first_token_seconds", model)
    assert sorted(ttft) == [*TTFT_BUCKETS_S, float("inf")]
    server_ttft = [r.server_ttft_ms / 1e3 for r in done]
    for le, count in ttft.items():
        exact = sum(t <= le - EPS for t in server_ttft), sum(t <= le + EPS for t in server_ttft)
        # the cancelled request's TTFT is unknown to its client but at most what its client measured
        assert exact[0] + (cancelled.ttft_s <= le) <= count <= exact[1] + 1, (le, count, server_ttft)
        # each request sits at or below the bucket of the TTFT its client measured
        assert count >= sum(r.ttft_s <= le for r in [*done, cancelled])
    assert _value(s2, "sglang:time_to_first_token_seconds_count", **m) == total
    ttft_sum = _value(s2, "sglang:time_to_first_token_seconds_sum", **m)
    assert sum(server_ttft) - EPS <= ttft_sum <= sum(server_ttft) + cancelled.ttft_s + EPS
    assert all(r.server_ttft_ms / 1e3 <= r.ttft_s + EPS for r in done)

    # --- end to end: within each client's own end-to-end time ------------------------------------------------
    e2e = _buckets(s2, "sglang:e2e_request_latency_seconds", model)
    assert sorted(e2e) == [*E2E_BUCKETS_S, float("inf")]
    cancelled_bound = run["cancelled_over_at"] - cancelled.start_s  # the router ended it before wait_idle saw 0
    for le, count in e2e.items():
        assert count >= sum(r.e2e_s <= le for r in done) + (cancelled_bound <= le), (le, count)
    assert _value(s2, "sglang:e2e_request_latency_seconds_count", **m) == total
    e2e_sum = _value(s2, "sglang:e2e_request_latency_seconds_sum", **m)
    assert ttft_sum < e2e_sum <= sum(r.e2e_s for r in done) + cancelled_bound

    # --- inter-token latency: every token after a request's first (its prefill's), within its decode time ------
    assert _value(s2, "sglang:inter_token_latency_seconds_count", **m) == generated - total
    assert 0 < _value(s2, "sglang:inter_token_latency_seconds_sum", **m) <= e2e_sum - ttft_sum + EPS

    # --- queue time (the router's queue): GenerateComplete.queue_ms, each below its TTFT --------------------
    router = {**m, "engine_type": "router", "tp_rank": "0", "pp_rank": "0", "worker": "router"}
    queue_s = [r.queue_ms / 1e3 for r in done]
    assert _value(s2, "sglang:queue_time_seconds_count", **router) == total
    queue_sum = _value(s2, "sglang:queue_time_seconds_sum", **router)
    assert sum(queue_s) - EPS <= queue_sum <= sum(queue_s) + cancelled.ttft_s + EPS and queue_sum <= ttft_sum
    queue = _buckets(s2, "sglang:queue_time_seconds", model, engine_type="router")
    for le, count in queue.items():
        assert sum(t <= le - EPS for t in queue_s) <= count <= sum(t <= le + EPS for t in queue_s) + 1

    # --- the workers, one series per process, labelled by its address ----------------------------------------
    workers = {dict(k)["engine_type"]: dict(k)["worker"] for n, k in s2 if n == "sglang:num_running_reqs"}
    assert workers == {"prefill": served["prefill"][0], "decode": served["decode"][0]}
    assert _series(s2, "sglang:num_queue_reqs") == {"router": 0, "prefill": 0, "decode": 0}
    for name in ("num_running_reqs", "num_used_tokens", "token_usage", "num_transfer_failed_reqs_total"):
        assert _series(s2, f"sglang:{name}") == {"prefill": 0, "decode": 0}, name
    assert _series(s2, "sglang:num_prefill_prealloc_queue_reqs") == {"router": 0}
    assert _series(s2, "sglang:num_prefill_inflight_queue_reqs") == {"prefill": 0}
    for name in ("num_decode_prealloc_queue_reqs", "num_decode_transfer_queue_reqs", "num_retracted_requests_total"):
        assert _series(s2, f"sglang:{name}") == {"decode": 0}, name

    # the load's interval (scrapes s1 → s2): its transfers and its prompts, from the completions
    moved = [r for r in load if r.transfer_bytes]
    assert len(moved) == len(load)  # every load request went on to its decode worker
    latency_ms = sum(r.transfer_ms for r in moved) / len(moved)
    speed = sum(r.transfer_bytes for r in moved) / (sum(r.transfer_ms for r in moved) / 1e3) / 1e9
    assert _series(s2, "sglang:kv_transfer_latency_ms")["prefill"] == pytest.approx(latency_ms, rel=1e-9)
    assert _series(s2, "sglang:kv_transfer_speed_gb_s")["prefill"] == pytest.approx(speed, rel=1e-9)
    hit_rate = sum(r.cached_tokens for r in load) / sum(r.input_tokens for r in load)
    assert 0 < hit_rate < 1
    assert _series(s2, "sglang:cache_hit_rate")["prefill"] == pytest.approx(hit_rate, rel=1e-12)
    assert _series(s2, "sglang:gen_throughput")["decode"] > 0

    # idle since s2: nothing generated; the hit rate and the transfer gauges keep their last values
    assert _series(s3, "sglang:gen_throughput") == {"prefill": 0, "decode": 0}
    for name in ("cache_hit_rate", "kv_transfer_latency_ms", "kv_transfer_speed_gb_s"):
        assert _series(s3, f"sglang:{name}") == _series(s2, f"sglang:{name}"), name
