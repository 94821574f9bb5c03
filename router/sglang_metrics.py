"""SGLang's Prometheus metrics (`sglang:*`), beside ours, so the dashboards and alerts written for SGLang read
a sparsepd deployment: the same names, types, label names and histogram buckets, where the meaning is the
same (README "Metrics" has the table, and which of SGLang's we do not have).

Which process exports what: SGLang counts a request's tokens and times in its tokenizer manager (the process
that holds the client's request from arrival to end) and its batches and queues in each scheduler process
(one per GPU worker). The router is our tokenizer manager, so it counts the request-side metrics as requests
go (`SglangRequestMetrics`, label `model_name`). The scheduler-side numbers are the workers': each worker
measures its engine's batch, queues, pages and counters and reports them in Stats; the router, which polls
every worker, exports them at scrape time (`SglangWorkerCollector`), one series per worker process with
SGLang's scheduler labels (`model_name`, `engine_type`, `tp_rank`, `pp_rank`) and ours, `worker` (its
address), as it exports its `sparsepd_worker_*` gauges. So one scrape of the router shows the deployment, and
a worker needs no HTTP port of its own. The router's own queue (requests admitted and waiting for a prefill)
and reservation step are what SGLang's prefill server queues; they are exported as the series of
`engine_type="router"`.

SGLang sets its throughput, hit-rate and transfer gauges from its last logging interval or transfer; here
they are computed over the interval since the previous scrape, and the hit rate and the transfer gauges keep
their last value through an interval in which nothing was prefilled or pushed.
"""

from __future__ import annotations

import threading
import time

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

# SGLang's default buckets (sglang/srt/metrics/collector.py)
TTFT_BUCKETS_S = (0.1, 0.2, 0.4, 0.6, 0.8, 1, 2, 4, 6, 8, 10, 20, 40, 60, 80, 100, 200, 400)
E2E_BUCKETS_S = (0.1, 0.2, 0.4, 0.6, 0.8, 1, 2, 4, 6, 8, 10, 20, 40, 60, 80, 100, 200, 400, 600, 1200, 1800, 2400)
ITL_BUCKETS_S = (0.002, 0.004, 0.006, 0.008, 0.010, 0.015, 0.020, 0.025, 0.030, 0.035, 0.040, 0.060, 0.080, 0.100,
                 0.200, 0.400, 0.600, 0.800, 1.0, 2.0, 4.0, 6.0, 8.0)
QUEUE_BUCKETS_S = (0.0, 0.1, 0.2, 0.5, 1, 2, 3, 4, 5, 10, 15, 20, 30, 40, 50, 60, 70, 80, 90, 100, 200, 300, 400, 500,
                   600, 700, 800, 900, 1000, 1200, 1400, 1600, 1800, 2000, 2500, 3000)

REQUEST_LABELS = ("model_name",)  # SGLang's tokenizer manager's
SCHEDULER_LABELS = ("model_name", "engine_type", "tp_rank", "pp_rank", "worker")  # its scheduler's, and ours
ROUTER = "router"  # engine_type and worker of the router's own queue series
INTERVAL_GAUGES = ("gen_throughput", "cache_hit_rate", "kv_transfer_latency_ms", "kv_transfer_speed_gb_s")


def engine_type(worker) -> str:
    """A worker process's engine_type: "prefill", "decode", or "unified" (colocated: both in one engine)."""
    return "unified" if worker.pair is not None else worker.role


def is_aborted(outcome) -> bool:
    """Ended by the client: an Abort call, or the stream cancelled (SGLang counts both as aborted requests)."""
    return outcome.finish_reason == "abort" and outcome.code in (None, grpc.StatusCode.CANCELLED)


class SglangRequestMetrics:
    """The request-side metrics: counted by the router's dispatcher hooks (router/metrics.py calls these)."""

    def __init__(self, registry: CollectorRegistry, model_name: str):
        r, lbl = registry, REQUEST_LABELS
        self.model_name = model_name

        def counter(name: str, doc: str):
            return Counter(f"sglang:{name}", doc, lbl, registry=r).labels(model_name)

        def histogram(name: str, doc: str, buckets, labels=lbl, values=(model_name,)):
            return Histogram(f"sglang:{name}", doc, labels, registry=r, buckets=buckets).labels(*values)

        # counted when a request ends, however it ended (SGLang: on its finished output, aborted ones included)
        self.num_requests = counter("num_requests_total", "Requests that ended, however they ended (each of n choices)")
        self.prompt_tokens = counter("prompt_tokens_total", "Prompt tokens of the requests that ended")
        self.generation_tokens = counter("generation_tokens_total", "Tokens streamed to clients")
        self.cached_tokens = counter("cached_tokens_total",
                                     "Prompt tokens restored from a prefill worker's prefix cache")
        self.aborted = counter("num_aborted_requests_total", "Requests ended by Abort or by their client going away")
        self.ttft = histogram("time_to_first_token_seconds", "Admission to the first token, seconds",
                              TTFT_BUCKETS_S)
        self.itl = histogram("inter_token_latency_seconds",
                             "Time between a request's chunks over their tokens, once per token, seconds",
                             ITL_BUCKETS_S)
        self.e2e = histogram("e2e_request_latency_seconds", "Admission to the end, seconds",
                             E2E_BUCKETS_S)
        # SGLang's scheduler measures a request's wait in its queue; ours waits in the router's
        self.queue_time = histogram("queue_time_seconds", "Admission to the prefill batch being sent, seconds",
                                    QUEUE_BUCKETS_S, SCHEDULER_LABELS, (model_name, ROUTER, "0", "0", ROUTER))

    def first_token(self, seconds: float) -> None:
        """Admission to the first token delivered."""
        self.ttft.observe(seconds)

    def generated(self, n: int, gap_s: float | None) -> None:
        """n tokens delivered gap_s after the request's previous ones (None: its first): each of them gets an
        inter-token latency of gap_s / n, as SGLang spreads a chunk's interval over its tokens."""
        if gap_s is not None and n > 0:
            for _ in range(n):
                self.itl.observe(gap_s / n)

    def ended(self, flow) -> None:
        """A request (one choice of n) ended: its tokens, its end-to-end time and its wait in the queue."""
        self.num_requests.inc()
        self.prompt_tokens.inc(len(flow.spec.input_ids))
        self.generation_tokens.inc(len(flow.output_ids))
        self.cached_tokens.inc(flow.cached_tokens)
        self.e2e.observe(time.monotonic() - flow.admitted_at)
        if flow.queue_ms > 0:  # it reached a prefill worker (a moved request: admission to its last prefill)
            self.queue_time.observe(flow.queue_ms / 1e3)
        if is_aborted(flow.outcome):
            self.aborted.inc()


class SglangWorkerCollector(Collector):
    """The scheduler-side metrics, read at scrape time from the dispatcher and its workers' last Stats."""

    def __init__(self, dispatcher, model_name: str):
        self.dispatcher, self.model_name = dispatcher, model_name
        self.lock = threading.Lock()  # scrapes may run on several threads at once: the windows below are shared
        self.previous: dict[tuple[str, str], tuple] = {}  # (worker address, source) → counters at the previous scrape
        self.polled_at: dict[str, float] = {}  # worker address → the time of the poll the previous scrape read
        self.held: dict[str, dict[str, float]] = {}  # address → its INTERVAL_GAUGES, kept while nothing happened

    def collect(self):
        d = self.dispatcher
        queue, flows = list(d.queue), list(d.flows.values())  # (snapshots: the event loop's thread changes them)
        workers = [w for w in list(d.pool.all) if w.alive and not (w.pair is not None and w.role == "prefill")]
        page_size = d.pool.placement.page_size
        f = _Families()
        router = [self.model_name, ROUTER, "0", "0", ROUTER]
        queued = {id(m) for flow in queue for m in flow.prefill_members}
        f.queue.add_metric(router, len(queued))
        # admitted, out of the queue, not yet sent to a prefill worker: reserving its decode pages (SGLang's
        # prefill server holds such requests in its bootstrap queue until the decode server has allocated)
        f.prefill_prealloc.add_metric(router, sum(1 for x in flows if x.prefill is None and id(x) not in queued))
        with self.lock:
            for w in workers:
                self._worker(f, w, [self.model_name, engine_type(w), "0", "0", w.address], page_size)
        yield from f.all()

    def _worker(self, f: _Families, w, key: list[str], page_size: int) -> None:
        s, kind = w.stats, key[1]
        f.running.add_metric(key, s.engine_running)
        f.queue.add_metric(key, s.engine_waiting)
        used_pages = max(0, s.num_pages - s.free_pages)  # (free_pages counts pages only the prefix cache holds)
        f.used_tokens.add_metric(key, used_pages * page_size)
        f.token_usage.add_metric(key, used_pages / s.num_pages if s.num_pages else 0.0)
        f.transfer_failed.add_metric(key, s.transfers_failed)
        rates = self._rates(w)
        f.gen_throughput.add_metric(key, rates["gen_throughput"])
        f.cache_hit_rate.add_metric(key, rates["cache_hit_rate"])
        if kind == "prefill":
            f.prefill_inflight.add_metric(key, s.transfers_in_flight)
            f.transfer_speed.add_metric(key, rates["kv_transfer_speed_gb_s"])
            f.transfer_latency.add_metric(key, rates["kv_transfer_latency_ms"])
        else:  # decode and unified: reservations
            f.decode_prealloc.add_metric(key, w.held_slots)  # Reserve calls in flight to it
            f.decode_transfer.add_metric(key, s.waiting)  # reserved, waiting for the state (or its local prefill)
            f.retracted.add_metric(key, s.retractions)
            if s.speculative.num_steps:
                f.spec_accept_length.add_metric(key, self._accept_length(w))

    def _accept_length(self, w) -> float:
        """Tokens a verification delivered on average since the previous scrape (its accepted drafts and the one
        drawn after them: SGLang's accept length), held while nothing was verified."""
        s = w.stats.speculative
        verified, accepted = self._delta((w.address, "speculative"), (s.verifications, s.accepted))
        held = self.held.setdefault(w.address, dict.fromkeys(INTERVAL_GAUGES, 0.0))
        if verified > 0:
            held["spec_accept_length"] = 1.0 + accepted / verified
        return held.get("spec_accept_length", 0.0)

    def _rates(self, w) -> dict[str, float]:
        """The worker's interval gauges since the previous scrape, from its Stats counters (they restart at 0 when
        it does) and the router's counts of its prefill results."""
        c = w.stats.prefix_cache
        tokens, hit, miss = self._delta((w.address, "stats"), (w.stats.tokens_generated, c.hit_tokens, c.miss_tokens))
        transfers, num_bytes, ms = self._delta((w.address, "results"), (w.transfers, w.transfer_bytes, w.transfer_ms))
        held = self.held.setdefault(w.address, dict.fromkeys(INTERVAL_GAUGES, 0.0))
        was_at = self.polled_at.get(w.address)
        if was_at is not None and w.stats_at > was_at:  # a newer poll: its tokens over the time between the polls
            held["gen_throughput"] = tokens / (w.stats_at - was_at)
        self.polled_at[w.address] = w.stats_at
        if hit + miss > 0:  # prompt tokens prefilled since: the share restored from the prefix cache
            held["cache_hit_rate"] = hit / (hit + miss)
        if transfers > 0:  # states pushed since: their mean time, and their bytes over their time
            held["kv_transfer_latency_ms"] = ms / transfers
            held["kv_transfer_speed_gb_s"] = num_bytes / (ms / 1e3) / 1e9 if ms > 0 else 0.0
        return held

    def _delta(self, key: tuple[str, str], now: tuple) -> tuple:
        """How far counters moved since the previous scrape (from zero when first seen or when one went back)."""
        was = self.previous.get(key)
        self.previous[key] = now
        if was is None or any(b < a for a, b in zip(was, now, strict=True)):
            return now
        return tuple(b - a for a, b in zip(was, now, strict=True))


class _Families:
    """One scrape's metric families: SGLang's names, with its scheduler labels."""

    def __init__(self):
        def gauge(name: str, doc: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"sglang:{name}", doc, labels=SCHEDULER_LABELS)

        def counter(name: str, doc: str) -> CounterMetricFamily:
            return CounterMetricFamily(f"sglang:{name}", doc, labels=SCHEDULER_LABELS)

        self.running = gauge("num_running_reqs", "Requests in the engine's running batch")
        self.queue = gauge("num_queue_reqs",
                           "Requests waiting: the router's admitted ones not yet prefilling, a worker engine's queue")
        self.used_tokens = gauge("num_used_tokens", "KV pages in use times the page size")
        self.token_usage = gauge("token_usage", "Share of the KV pages in use")
        self.gen_throughput = gauge("gen_throughput", "Tokens generated per second between two polls of the worker")
        self.cache_hit_rate = gauge("cache_hit_rate", "Share of the prompt tokens prefilled since the previous "
                                    "scrape restored from the prefix cache")
        self.prefill_prealloc = gauge("num_prefill_prealloc_queue_reqs",
                                      "Requests out of the router's queue reserving their decode pages")
        self.prefill_inflight = gauge("num_prefill_inflight_queue_reqs",
                                      "States a prefill worker pushed, not yet acknowledged")
        self.decode_prealloc = gauge("num_decode_prealloc_queue_reqs",
                                     "The router's Reserve calls in flight to a decode worker")
        self.decode_transfer = gauge("num_decode_transfer_queue_reqs",
                                     "A decode worker's reservations waiting for their state")
        self.transfer_speed = gauge("kv_transfer_speed_gb_s",
                                    "Bytes over push time of the states pushed since the previous scrape, GB/s")
        self.transfer_latency = gauge("kv_transfer_latency_ms",
                                      "Mean push time of the states pushed since the previous scrape, ms")
        self.spec_accept_length = gauge("spec_accept_length", "Tokens a speculative verification delivered on "
                                        "average since the previous scrape (accepted drafts + 1)")
        self.retracted = counter("num_retracted_requests_total", "Requests moved to host memory for want of a page")
        self.transfer_failed = counter("num_transfer_failed_reqs_total", "State pushes that failed (prefill), "
                                       "reservations expired without their state (decode)")

    def all(self) -> list:
        return list(vars(self).values())
