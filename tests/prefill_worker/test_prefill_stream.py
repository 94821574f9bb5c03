"""PrefillStream: each request's first token as soon as its state is pushed, before the decode worker acknowledges
it, and each request's final result as soon as its push settles, not when the whole batch has; a request refused
alone is answered first; every request gets exactly one final result, the same as Prefill's; a call the router
gives up on still settles its pushes. No timing: the acks are futures the test settles."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).parent))
from held_sender import BOUND_S, make_batch, make_service  # noqa: E402

from sparsepd.proto import worker_pb2  # noqa: E402
from sparsepd.proto.transfer import Ack  # noqa: E402


async def _next(stream) -> list[worker_pb2.PrefillResult]:
    return list((await asyncio.wait_for(stream.__anext__(), BOUND_S)).results)


def test_first_tokens_come_before_the_acks_and_each_result_when_its_push_settles(tiny):
    service, worker, sender, engine = make_service(tiny)
    batch = make_batch("s1", "s2")
    long_id = batch.requests.add()  # refused alone: the transfer header cannot carry its id
    long_id.CopyFrom(make_batch("x" * 300).requests[0])

    async def scenario():
        call = asyncio.create_task(service.Prefill(make_batch("u1", "u2"), None))  # the same prompts, as one answer
        for _, tid, future in [await sender.next_push(), await sender.next_push()]:
            future.set_result(Ack(transfer_id=tid, ok=True))
        reference = await asyncio.wait_for(call, BOUND_S)
        stream = service.PrefillStream(batch, None)
        refused = await _next(stream)
        pending = await _next(stream) + await _next(stream)
        pushes = {rid: (tid, future) for rid, tid, future in [await sender.next_push(), await sender.next_push()]}
        assert worker.transfers_in_flight == 2 and not any(f.done() for _, f in pushes.values())
        tid, future = pushes["s2"]
        future.set_result(Ack(transfer_id=tid, ok=True))
        s2 = await _next(stream)  # s2's result while s1's ack is still held
        assert worker.transfers_in_flight == 1
        tid, future = pushes["s1"]
        future.set_result(Ack.reject(tid, "no such ticket"))
        s1 = await _next(stream)
        rest = [r async for response in stream for r in response.results]
        return reference, refused, pending, s2, s1, rest

    try:
        reference, refused, pending, s2, s1, rest = asyncio.run(scenario())
    finally:
        sender.fail_the_rest()
        service.executor.shutdown(wait=True)
    assert [(r.request_id, r.ok, r.error_code, r.transfer_pending) for r in refused] == [
        ("x" * 300, False, grpc.StatusCode.INVALID_ARGUMENT.value[0], False)]
    assert "request_id of 300 characters" in refused[0].error
    tokens = {r.request_id: r.first_token for r in reference.results}
    assert sorted(r.request_id for r in pending) == ["s1", "s2"]
    for r in pending:  # a first token, nothing of the transfer yet
        assert r.ok and r.transfer_pending and not r.error and r.transfer_ms == 0
        assert r.first_token == tokens["u" + r.request_id[1:]], (r, tokens)
    assert [(r.request_id, r.ok, r.transfer_pending, r.error) for r in s2] == [("s2", True, False, "")]
    assert s2[0].transfer_bytes > 0 and s2[0].transfer_ms > 0 and s2[0].first_token == tokens["u2"]
    assert [(r.request_id, r.ok, r.transfer_pending, r.error) for r in s1] == [
        ("s1", False, False, "decode worker rejected the state: no such ticket")]
    assert rest == []  # every request had its one final result
    assert worker.transfers_in_flight == 0 and not worker.batches and engine.holds_nothing()
    assert dict(worker.counters) == {"transfers_ok": 2 + 1, "transfers_failed": 1,
                                     "transfer_bytes": sum(r.transfer_bytes for r in reference.results)
                                     + s2[0].transfer_bytes}


def test_a_stream_closed_while_its_acks_are_held_still_settles_them(tiny):
    service, worker, sender, engine = make_service(tiny)

    async def scenario():
        stream = service.PrefillStream(make_batch("c1"), None)
        (first,) = await _next(stream)
        assert first.transfer_pending
        c1 = await sender.next_push()
        await stream.aclose()  # the router gave up on the call (its deadline, a lost connection)
        assert worker.transfers_in_flight == 1 and [b.members for b in worker.batches] == [["c1"]]
        c1[2].set_result(Ack(transfer_id=c1[1], ok=True))  # the ack comes after all
        for _ in range(100):  # the batch's own task completes it on this loop
            if not worker.batches:
                break
            await asyncio.sleep(0.01)

    try:
        asyncio.run(scenario())
    finally:
        sender.fail_the_rest()
        service.executor.shutdown(wait=True)
    assert worker.transfers_in_flight == 0 and not worker.batches
    assert worker.counters["transfers_ok"] == 1 and engine.holds_nothing()
