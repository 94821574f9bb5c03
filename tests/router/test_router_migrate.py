"""Moving a request off a lost worker, the router's bookkeeping without processes: the next attempt's worker id,
what it prefills, the queue head, the migration count and its bound, and how long work waits while no worker
of a role is alive."""

from __future__ import annotations

import time

import grpc

from sparsepd.proto import worker_pb2
from sparsepd.router.dispatch import Dispatcher
from sparsepd.router.flow import Flow
from sparsepd.router.metrics import RouterMetrics
from sparsepd.router.params import RequestSpec
from sparsepd.router.workers import WorkerPool


def _spec(request_id: str = "r", n: int = 1) -> RequestSpec:
    return RequestSpec(request_id, [256, 1, 2, 3], worker_pb2.SamplingParams(max_new_tokens=8, seed=5), 8, n=n)


def _dispatcher(max_migrations: int = 2) -> tuple[Dispatcher, RouterMetrics]:
    metrics = RouterMetrics()
    return Dispatcher(WorkerPool([], [], worker_wait_s=0.3), metrics=metrics, max_migrations=max_migrations), metrics


def _admit(d: Dispatcher, spec: RequestSpec) -> list[Flow]:
    flows = [Flow(s) for s in spec.choices()]
    for f in flows:
        f.group = flows if len(flows) > 1 else None
        d.flows[f.request_id] = d.by_worker_id[f.worker_id] = f
    return flows


def test_a_moved_flow_resumes_alone_under_a_new_worker_id_at_the_queue_head():
    d, metrics = _dispatcher()
    first, second = _admit(d, _spec("r", n=2))
    d.queue.append(Flow(_spec("other")))
    second.output_ids[:] = [7, 8, 9]
    second.first_known, second.early = True, ["stale event"]
    d._migrate(second, "decode", "decode worker X went away")
    assert d.queue[0] is second and second.worker_id == "r#1@1" and d.by_worker_id["r#1@1"] is second
    assert "r#1" not in d.by_worker_id and d.by_worker_id["r"] is first  # the old id's answers are ignored
    assert second.prefill_members == [second] and first.prefill_members == [first, second]
    assert (second.prefill_len, second.first_known, second.early) == (4 + 3, False, [])
    assert second.output_ids == [7, 8, 9] and not second.ended
    assert metrics.registry.get_sample_value("sparsepd_router_migrations_total", {"cause": "decode"}) == 1


def test_a_flow_moved_too_often_fails_unavailable_naming_the_cause():
    d, metrics = _dispatcher(max_migrations=1)
    (flow,) = _admit(d, _spec())
    d._migrate(flow, "prefill", "prefill worker P failed: Socket closed")
    assert flow.attempt == 1 and not flow.ended
    d._migrate(flow, "decode", "decode worker D went away: its token stream failed")
    assert flow.ended and flow.outcome.code == grpc.StatusCode.UNAVAILABLE
    assert flow.outcome.message == ("decode worker D went away: its token stream failed; not moved again: it was "
                                    "moved 1 times already (--max-migrations)")
    assert not d.flows and not d.by_worker_id and flow not in d.queue
    assert metrics.registry.get_sample_value("sparsepd_router_migrations_total", {"cause": "prefill"}) == 1
    assert metrics.registry.get_sample_value("sparsepd_router_migrations_total", {"cause": "decode"}) is None


def test_work_waits_for_a_lost_role_only_worker_wait_s():
    pool = WorkerPool([], ["127.0.0.1:1"], worker_wait_s=0.3)
    assert "no prefill worker is alive (" in pool.out_of_service("prefill")  # none ever: no wait
    (decode,) = pool.decode
    decode.alive = True
    assert pool.out_of_service("decode") is None
    decode.mark_dead("UNAVAILABLE: Connection refused")
    assert pool.out_of_service("decode") is None  # the wait starts
    pool.decode.clear()  # forgotten meanwhile: still waiting (it may register again)
    assert pool.out_of_service("decode") is None
    time.sleep(0.35)
    assert pool.out_of_service("decode").startswith("no decode worker is alive for 0 s")


def test_a_flow_whose_moved_id_is_another_requests_fails_unavailable_and_leaves_that_request_alone():
    d, metrics = _dispatcher()
    first, second = _admit(d, _spec("x", n=2))
    (other,) = _admit(d, _spec("x#1@1"))  # a client's own id, equal to the one choice 1 would have once moved
    d._migrate(second, "decode", "decode worker D went away")
    assert second.ended and second.outcome.code == grpc.StatusCode.UNAVAILABLE
    assert "'x#1@1', is another request's in flight" in second.outcome.message, second.outcome.message
    assert d.by_worker_id["x#1@1"] is other and not other.ended  # its tokens still reach it
    assert first.ended  # a failed choice ends its request
    assert metrics.registry.get_sample_value("sparsepd_router_migrations_total", {"cause": "decode"}) is None
