"""SGLang's metric names without processes: the request-side counters and histograms through the dispatcher's
own delivery and end paths (tokens, aborts, cancels, failures, inter-token latency as SGLang spreads a chunk's
interval), and the scheduler-side series from the workers' Stats and the router's queue: one series per
process (a colocated worker once, as "unified"), SGLang's label names, the interval gauges over scrapes, held
while nothing happened, and restarted from zero when a worker's counters go back."""

from __future__ import annotations

from collections import deque
from types import SimpleNamespace

import grpc
import pytest
from prometheus_client import CollectorRegistry

from sparsepd.proto import worker_pb2
from sparsepd.router.dispatch import Dispatcher
from sparsepd.router.flow import Flow
from sparsepd.router.metrics import RouterMetrics
from sparsepd.router.params import RequestSpec
from sparsepd.router.sglang_metrics import ITL_BUCKETS_S, QUEUE_BUCKETS_S, SglangWorkerCollector
from sparsepd.router.workers import WorkerPool

MODEL = {"model_name": "sparsepd/tiny"}
ROUTER = {**MODEL, "engine_type": "router", "tp_rank": "0", "pp_rank": "0", "worker": "router"}


def _spec(request_id: str, prompt_len: int, max_new: int, n: int = 1) -> RequestSpec:
    return RequestSpec(request_id, list(range(1, prompt_len + 1)), worker_pb2.SamplingParams(max_new_tokens=max_new),
                       max_new, n=n)


def _admit(d, spec: RequestSpec) -> list[Flow]:
    flows = [Flow(s) for s in spec.choices()]
    for f in flows:
        f.group = flows if len(flows) > 1 else None
        d.flows[f.request_id] = d.by_worker_id[f.worker_id] = f
    return flows


def test_request_metrics_through_delivery_and_end():
    metrics = RouterMetrics("sparsepd/tiny")
    d = Dispatcher(WorkerPool([], []), metrics=metrics)
    get = lambda name, labels=MODEL: metrics.registry.get_sample_value(name, labels)

    (done,) = _admit(d, _spec("done", 7, 3))
    done.cached_tokens, done.queue_ms = 4, 250.0
    d._deliver(done, [11], "")  # the prefill's first token
    done.last_token_at -= 0.021  # its next chunk of two comes 21 ms later
    d._deliver(done, [12, 13], "")  # max_new_tokens: it ends
    assert done.ended and done.outcome.finish_reason == "length"

    (cancelled,) = _admit(d, _spec("cancelled", 5, 8))
    d._deliver(cancelled, [21], "")
    d.cancel(cancelled)
    (aborted,) = _admit(d, _spec("aborted", 3, 8))
    assert d.abort("aborted")
    (failed,) = _admit(d, _spec("failed", 2, 8))
    d.abort_all("the router is shutting down")  # UNAVAILABLE: a failure, not an abort
    assert failed.outcome.code == grpc.StatusCode.UNAVAILABLE and aborted.outcome.code is None

    assert get("sglang:num_requests_total") == 4
    assert get("sglang:num_aborted_requests_total") == 2  # the Abort call and the cancelled stream
    assert get("sglang:prompt_tokens_total") == 7 + 5 + 3 + 2
    assert get("sglang:generation_tokens_total") == 3 + 1 == get("sparsepd_router_generated_tokens_total", {})
    assert get("sglang:cached_tokens_total") == 4
    assert get("sglang:time_to_first_token_seconds_count") == 2
    assert get("sglang:e2e_request_latency_seconds_count") == 4
    # the two tokens after the first: one interval of ~21 ms spread over them (SGLang: interval / new tokens)
    assert get("sglang:inter_token_latency_seconds_count") == 2
    assert get("sglang:inter_token_latency_seconds_sum") == pytest.approx(0.021, abs=2e-3)
    assert get("sglang:inter_token_latency_seconds_bucket", {**MODEL, "le": "0.008"}) == 0
    assert get("sglang:inter_token_latency_seconds_bucket", {**MODEL, "le": "0.015"}) == 2
    assert get("sglang:queue_time_seconds_count", ROUTER) == 1  # only "done" reached a prefill worker
    assert get("sglang:queue_time_seconds_sum", ROUTER) == 0.25
    assert get("sglang:queue_time_seconds_bucket", {**ROUTER, "le": "0.2"}) == 0
    assert get("sglang:queue_time_seconds_bucket", {**ROUTER, "le": "0.5"}) == 1
    assert ITL_BUCKETS_S[0] == 0.002 and QUEUE_BUCKETS_S[:3] == (0.0, 0.1, 0.2)


def _stats(**kw) -> worker_pb2.StatsResponse:
    return worker_pb2.StatsResponse(num_pages=100, num_slots=8, free_slots=8, **kw)


def _labels(kind: str, worker: str) -> dict:
    return {**MODEL, "engine_type": kind, "tp_rank": "0", "pp_rank": "0", "worker": worker}


@pytest.fixture
def scrape():
    """A pool of a prefill, a decode, a colocated and a dead decode worker, a dispatcher view of it, and a
    scrape: {(name, labels): value} of SglangWorkerCollector's samples."""
    pool = WorkerPool(["p:1"], ["d:2", "dead:4"], ["c:3"], page_size=16)
    for w in pool.all:
        w.alive = w.address != "dead:4"
    d = SimpleNamespace(pool=pool, queue=deque(), flows={}, by_worker_id={})
    collector = SglangWorkerCollector(d, "sparsepd/tiny")
    registry = CollectorRegistry()
    registry.register(collector)

    def take() -> dict:
        return {(s.name, frozenset(s.labels.items())): s.value for f in registry.collect() for s in f.samples}

    return SimpleNamespace(pool=pool, d=d, take=take, handle=lambda kind, address: next(
        w for w in pool.all if w.address == address and w.role == kind))


def test_one_series_per_process_from_its_stats_and_the_router_queue(scrape):
    p, dw, cp, cd = (scrape.handle("prefill", "p:1"), scrape.handle("decode", "d:2"), scrape.handle("prefill", "c:3"),
                     scrape.handle("decode", "c:3"))
    p.stats = _stats(free_pages=70, running=2, waiting=3, engine_running=2, engine_waiting=3, transfers_in_flight=4,
                     transfers_failed=1)
    dw.stats = _stats(free_pages=40, running=6, waiting=2, engine_running=5, engine_waiting=1, retractions=7,
                      transfers_failed=2)
    cd.stats = cp.stats = _stats(free_pages=0, running=1, waiting=1, engine_running=1, retractions=0)
    dw.hold(3), dw.hold(3)  # two Reserve calls in flight
    group = _admit(scrape.d, _spec("queued", 4, 8, n=2))  # waiting in the router's queue: two requests
    scrape.d.queue.append(group[0])
    _admit(scrape.d, _spec("reserving", 4, 8))  # out of the queue, no prefill worker yet
    (sent,) = _admit(scrape.d, _spec("sent", 4, 8))
    sent.prefill = p
    got = scrape.take()
    value = lambda name, kind, worker: got[(f"sglang:{name}", frozenset(_labels(kind, worker).items()))]

    names = {n for n, _ in got}
    assert {frozenset(dict(k).keys()) for n, k in got} == {frozenset(_labels("x", "y"))}
    series = {(dict(k)["engine_type"], dict(k)["worker"]) for n, k in got if n == "sglang:num_running_reqs"}
    assert series == {("prefill", "p:1"), ("decode", "d:2"), ("unified", "c:3")}  # not the dead one; c:3 once
    assert value("num_queue_reqs", "router", "router") == 2
    assert value("num_prefill_prealloc_queue_reqs", "router", "router") == 1
    assert [value("num_running_reqs", *w) for w in (("prefill", "p:1"), ("decode", "d:2"), ("unified", "c:3"))] == [
        2, 5, 1]
    assert [value("num_queue_reqs", *w) for w in (("prefill", "p:1"), ("decode", "d:2"), ("unified", "c:3"))] == [
        3, 1, 0]
    assert value("num_used_tokens", "prefill", "p:1") == 30 * 16 and value("token_usage", "prefill", "p:1") == 0.3
    assert value("num_used_tokens", "unified", "c:3") == 100 * 16 and value("token_usage", "unified", "c:3") == 1.0
    assert value("num_prefill_inflight_queue_reqs", "prefill", "p:1") == 4
    assert value("num_decode_prealloc_queue_reqs", "decode", "d:2") == 2
    assert value("num_decode_transfer_queue_reqs", "decode", "d:2") == 2
    assert value("num_decode_transfer_queue_reqs", "unified", "c:3") == 1
    assert value("num_retracted_requests_total", "decode", "d:2") == 7
    assert value("num_transfer_failed_reqs_total", "prefill", "p:1") == 1
    assert value("num_transfer_failed_reqs_total", "decode", "d:2") == 2
    assert "sglang:spec_accept_length" not in names  # no speculative decoding
    # the prefill queues are the prefill side's, the decode ones the decode side's
    assert {dict(k)["engine_type"] for n, k in got if n == "sglang:num_prefill_inflight_queue_reqs"} == {"prefill"}
    assert {dict(k)["engine_type"] for n, k in got if n == "sglang:num_decode_transfer_queue_reqs"} == {
        "decode", "unified"}


def test_interval_gauges_over_scrapes_held_while_idle_and_reset_by_a_restart(scrape):
    p, dw = scrape.handle("prefill", "p:1"), scrape.handle("decode", "d:2")

    def poll(w, at: float, **stats) -> None:
        cache = worker_pb2.PrefixCacheStats(enabled=True, hit_tokens=stats.pop("hit", 0),
                                            miss_tokens=stats.pop("miss", 0))
        w.stats, w.stats_at = _stats(free_pages=100, prefix_cache=cache, **stats), at

    def gauges() -> dict:
        got = scrape.take()
        out = {}
        for name in ("gen_throughput", "cache_hit_rate", "kv_transfer_latency_ms", "kv_transfer_speed_gb_s"):
            for kind, w in (("prefill", "p:1"), ("decode", "d:2")):
                key = (f"sglang:{name}", frozenset(_labels(kind, w).items()))
                if key in got:
                    out[name, kind] = got[key]
        return out

    poll(p, 10.0, hit=0, miss=40)
    poll(dw, 10.0, tokens_generated=100)
    assert gauges() == {("gen_throughput", "prefill"): 0, ("gen_throughput", "decode"): 0,  # no interval yet
                        ("cache_hit_rate", "prefill"): 0, ("cache_hit_rate", "decode"): 0,
                        ("kv_transfer_latency_ms", "prefill"): 0, ("kv_transfer_speed_gb_s", "prefill"): 0}
    poll(p, 10.5, hit=30, miss=110)  # 30 of the 100 prompt tokens since came from the cache
    poll(dw, 10.5, tokens_generated=160)  # 60 tokens in 0.5 s
    p.transfers, p.transfer_bytes, p.transfer_ms = 2, 4_000_000, 8.0  # (the router's counts of its results)
    g = gauges()
    assert g["gen_throughput", "decode"] == pytest.approx(120.0)
    assert g["cache_hit_rate", "prefill"] == pytest.approx(0.3)
    assert g["kv_transfer_latency_ms", "prefill"] == pytest.approx(4.0)
    assert g["kv_transfer_speed_gb_s", "prefill"] == pytest.approx(0.5)  # 4 MB in 8 ms
    assert gauges() == g  # a scrape before the next poll: the same values
    poll(p, 11.0, hit=30, miss=110)
    poll(dw, 11.0, tokens_generated=160)
    g2 = gauges()  # idle: nothing generated; the hit rate and transfers keep their last values
    assert g2 == {**g, ("gen_throughput", "decode"): 0}
    poll(p, 11.5, hit=30, miss=120)  # 10 prompt tokens, none cached
    p.transfers, p.transfer_bytes, p.transfer_ms = 3, 4_500_000, 9.0
    g3 = gauges()
    assert g3["cache_hit_rate", "prefill"] == 0 and g3["kv_transfer_latency_ms", "prefill"] == pytest.approx(1.0)
    assert g3["kv_transfer_speed_gb_s", "prefill"] == pytest.approx(0.5)
    poll(p, 12.0, hit=5, miss=15)  # restarted: its counters from zero (the router's transfer counts go on)
    g4 = gauges()
    assert g4["cache_hit_rate", "prefill"] == pytest.approx(0.25)
    assert g4["kv_transfer_latency_ms", "prefill"] == g3["kv_transfer_latency_ms", "prefill"]
