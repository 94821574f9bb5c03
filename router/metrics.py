"""Prometheus metrics of the router (prometheus_client, on its own registry and HTTP port).

Counted as requests go: requests by how they ended, prompt and generated tokens, time to first token,
time per output token, P→D transfer bytes and time, requests moved after a worker was lost, requests put
back to wait for decode room. Read at scrape
time: the admission queue, requests in flight, and per worker the pages in use and free, running and
waiting requests, liveness. SGLang's metrics (`sglang:*`) are exported beside these on the same endpoint
(router/sglang_metrics.py).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from sparsepd.router.sglang_metrics import SglangRequestMetrics, SglangWorkerCollector

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class RouterMetrics:
    def __init__(self, model_name: str = ""):
        """model_name: the served model's name (SGLang's `model_name` label)."""
        self.registry = CollectorRegistry()
        self.model_name = model_name
        r, ns = self.registry, "sparsepd_router"
        self.requests = Counter("requests", "Requests that ended, by finish reason or error status", ["outcome"],
                                namespace=ns, registry=r)
        self.admitted_requests = Counter("admitted_requests", "Requests admitted into the queue", namespace=ns,
                                         registry=r)
        self.prompt_tokens = Counter("prompt_tokens", "Prompt tokens of admitted requests", namespace=ns, registry=r)
        self.generated_tokens = Counter("generated_tokens", "Tokens streamed to clients", namespace=ns, registry=r)
        self.ttft = Histogram("time_to_first_token_seconds", "Admission to the first token", namespace=ns,
                              registry=r, buckets=LATENCY_BUCKETS_S)
        self.tpot = Histogram("time_per_output_token_seconds", "Mean time between a request's later tokens",
                              namespace=ns, registry=r, buckets=TPOT_BUCKETS_S)
        self.transfer_bytes = Counter("transfer_bytes", "Prefill→decode state bytes", namespace=ns, registry=r)
        self.transfer_seconds = Histogram("transfer_seconds", "Prefill→decode state push time per request",
                                          namespace=ns, registry=r, buckets=LATENCY_BUCKETS_S)
        self.migrations = Counter("migrations", "Requests moved to other workers after theirs was lost, by the role "
                                  "of the lost worker", ["cause"], namespace=ns, registry=r)
        self.sglang = SglangRequestMetrics(r, model_name)
        self.requeued = Counter("requeued", "Requests put back at the head of the queue because no decode worker "
                                "had room for them", namespace=ns, registry=r)
        self.server = None

    def watch(self, dispatcher) -> None:
        """Report the dispatcher's queue and workers at every scrape."""
        self.registry.register(_LiveCollector(dispatcher))
        self.registry.register(SglangWorkerCollector(dispatcher, self.model_name))

    def serve(self, host: str, port: int) -> int:
        """Start the HTTP endpoint (/metrics); return its port."""
        self.server, _ = start_http_server(port, addr=host, registry=self.registry)
        return self.server.server_port

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    # --- hooks the dispatcher calls ---------------------------------------------------------------
    def admitted(self, prompt_tokens: int) -> None:
        self.admitted_requests.inc()
        self.prompt_tokens.inc(prompt_tokens)

    def generated(self, n: int, gap_s: float | None = None) -> None:
        """n tokens delivered, gap_s after the request's previous ones (None: its first)."""
        self.generated_tokens.inc(n)
        self.sglang.generated(n, gap_s)

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)
        self.sglang.first_token(seconds)

    def transfer(self, num_bytes: int, seconds: float) -> None:
        self.transfer_bytes.inc(num_bytes)
        self.transfer_seconds.observe(seconds)

    def put_back(self) -> None:
        self.requeued.inc()

    def migrated(self, cause: str) -> None:
        self.migrations.labels(cause).inc()

    def ended(self, flow) -> None:
        o = flow.outcome
        self.requests.labels(o.code.name.lower() if o.code is not None else o.finish_reason).inc()
        n = len(flow.output_ids)
        if n > 1 and flow.last_token_at > flow.first_token_at:
            self.tpot.observe((flow.last_token_at - flow.first_token_at) / (n - 1))
        self.sglang.ended(flow)


class _LiveCollector(Collector):
    def __init__(self, dispatcher):
        self.dispatcher = dispatcher

    def collect(self):
        d = self.dispatcher
        queue = GaugeMetricFamily("sparsepd_router_queue_length", "Requests admitted and waiting for prefill")
        queue.add_metric([], len(d.queue))
        inflight = GaugeMetricFamily("sparsepd_router_requests_in_flight", "Requests admitted and not ended")
        inflight.add_metric([], len(d.flows))
        labels = ["worker", "role"]
        pages_used = GaugeMetricFamily("sparsepd_worker_pages_in_use", "KV pages in use", labels=labels)
        pages_free = GaugeMetricFamily("sparsepd_worker_pages_free", "KV pages free", labels=labels)
        running = GaugeMetricFamily("sparsepd_worker_running_requests", "Requests running", labels=labels)
        waiting = GaugeMetricFamily("sparsepd_worker_waiting_requests", "Requests waiting", labels=labels)
        alive = GaugeMetricFamily("sparsepd_worker_alive", "1 when the last poll succeeded", labels=labels)
        hit = CounterMetricFamily("sparsepd_prefix_cache_hit_tokens", "Prompt tokens a prefill worker restored from "
                                  "its prefix cache instead of computing them", labels=labels)
        miss = CounterMetricFamily("sparsepd_prefix_cache_miss_tokens", "Prompt tokens a prefill worker computed "
                                   "(requests that looked its prefix cache up)", labels=labels)
        evicted = CounterMetricFamily("sparsepd_prefix_cache_evictions", "Prefix-cache boundary snapshots evicted",
                                      labels=labels)
        page_evicted = CounterMetricFamily("sparsepd_prefix_cache_page_evictions", "Prefix-cache tree nodes (one "
                                           "page each) evicted", labels=labels)
        hits = CounterMetricFamily("sparsepd_prefix_cache_hits", "Requests a prefill worker restored from its "
                                   "prefix cache", labels=labels)
        cache_pages = GaugeMetricFamily("sparsepd_prefix_cache_pages", "KV pages the prefix cache's tree holds (its "
                                        "size)", labels=labels)
        entries = GaugeMetricFamily("sparsepd_prefix_cache_entries", "Prefix-cache boundary snapshots (restore "
                                    "points)", labels=labels)
        cache_bytes = GaugeMetricFamily("sparsepd_prefix_cache_bytes", "Device bytes the prefix cache holds (its "
                                        "snapshots and the pages only it holds)", labels=labels)
        host_hit = CounterMetricFamily("sparsepd_prefix_cache_host_hit_tokens", "Of the hit tokens: restored from "
                                       "the host tier", labels=labels)
        host_evicted = CounterMetricFamily("sparsepd_prefix_cache_host_evictions", "Host-tier snapshots evicted",
                                           labels=labels)
        host_entries = GaugeMetricFamily("sparsepd_prefix_cache_host_entries", "Host-tier snapshots", labels=labels)
        host_bytes = GaugeMetricFamily("sparsepd_prefix_cache_host_bytes", "Host bytes of the host-tier snapshots",
                                       labels=labels)
        retracted = CounterMetricFamily("sparsepd_worker_retractions", "Requests a worker moved back to waiting "
                                        "(state to host memory) for want of a KV page", labels=labels)
        drafted = CounterMetricFamily("sparsepd_worker_spec_drafted_tokens", "Draft tokens a decode worker "
                                      "verified (speculative decoding)", labels=labels)
        accepted = CounterMetricFamily("sparsepd_worker_spec_accepted_tokens", "Draft tokens a decode worker "
                                       "accepted (speculative decoding)", labels=labels)
        accept_len = CounterMetricFamily("sparsepd_worker_spec_accept_length", "Verifications that accepted "
                                         "`length` drafts", labels=[*labels, "length"])
        forwards = CounterMetricFamily("sparsepd_worker_forwards", "Engine forwards a worker ran, by path: graph "
                                       "(replayed from a CUDA graph), prefill_graph (prompt chunks replayed), split "
                                       "(a decode replay beside prompt chunks), eager", labels=[*labels, "path"])
        for w in d.pool.all:
            key, s = [w.address, w.role], w.stats
            for path, n in sorted(s.forwards.items()):
                forwards.add_metric([*key, path], n)
            pages_used.add_metric(key, s.num_pages - s.free_pages)
            pages_free.add_metric(key, s.free_pages)
            running.add_metric(key, s.running)
            waiting.add_metric(key, s.waiting)
            alive.add_metric(key, 1 if w.alive else 0)
            if w.role == "decode":
                retracted.add_metric(key, s.retractions)
            if s.speculative.num_steps:
                drafted.add_metric(key, s.speculative.drafted)
                accepted.add_metric(key, s.speculative.accepted)
                for length, n in enumerate(s.speculative.accept_lengths):
                    accept_len.add_metric([*key, str(length)], n)
            c = s.prefix_cache
            if c.enabled:  # (the worker's own counts: they restart from 0 when it does)
                hit.add_metric(key, c.hit_tokens)
                miss.add_metric(key, c.miss_tokens)
                evicted.add_metric(key, c.evictions)
                page_evicted.add_metric(key, c.page_evictions)
                hits.add_metric(key, c.hits)
                cache_pages.add_metric(key, c.pages)
                entries.add_metric(key, c.entries)
                cache_bytes.add_metric(key, c.num_bytes)
                host_hit.add_metric(key, c.host_hit_tokens)
                host_evicted.add_metric(key, c.host_evictions)
                host_entries.add_metric(key, c.host_entries)
                host_bytes.add_metric(key, c.host_num_bytes)
        yield from (queue, inflight, pages_used, pages_free, running, waiting, alive, hit, miss, evicted, page_evicted,
                    hits, cache_pages, entries, cache_bytes, host_hit, host_evicted, host_entries, host_bytes,
                    retracted, drafted, accepted, accept_len, forwards)
