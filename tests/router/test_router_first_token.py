"""The first token reaches the client as soon as the prefill worker drew it (PrefillStream's pending result), not
after the decode worker acknowledged the state: through the real dispatcher against scripted workers on 127.0.0.1.
Decode events that come before the request's final result wait for it; a transfer that fails after the first token
ends the request (UNAVAILABLE) with that token delivered; a stream lost after it moves the request, which resumes
after the token; a worker without PrefillStream is asked with Prefill."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).parent))
from test_router_stage import (  # noqa: E402
    DEC,
    END,
    FIRST_TOKEN,
    PRE,
    Rig,
    ScriptedPrefill,
    end_events,
    settle,
    until,
)

from sparsepd.proto import worker_pb2  # noqa: E402


class StreamingPrefill(ScriptedPrefill):
    """PrefillStream: every request's first token at once, then each final result once `acks` is set (failed
    transfers for the ids in `bad_transfer`; the whole call fails once with `fail_after_first`)."""

    def __init__(self):
        super().__init__()
        self.acks = asyncio.Event()
        self.bad_transfer: set[str] = set()
        self.fail_after_first: grpc.StatusCode | None = None
        self.streamed: list[worker_pb2.PrefillRequest] = []

    async def PrefillStream(self, batch, context):
        self.streamed += list(batch.requests)
        yield worker_pb2.PrefillResponse(results=[
            worker_pb2.PrefillResult(request_id=r.request_id, ok=True, first_token=FIRST_TOKEN, transfer_pending=True)
            for r in batch.requests])
        if self.fail_after_first is not None:
            code, self.fail_after_first = self.fail_after_first, None
            await context.abort(code, "the scripted prefill worker went away")
        await self.acks.wait()
        for r in batch.requests:
            bad = r.request_id in self.bad_transfer
            yield worker_pb2.PrefillResponse(results=[worker_pb2.PrefillResult(
                request_id=r.request_id, ok=not bad, error="state transfer failed: no ack within 10s" if bad else "",
                first_token=FIRST_TOKEN, transfer_bytes=0 if bad else 1000, transfer_ms=0 if bad else 2.0)])


def _tokens(flow) -> list[int]:
    return [t for kind, payload in list(flow.events._queue) if kind == "tokens" for t in payload]


def test_the_first_token_goes_out_before_the_transfer_is_acknowledged():
    async def scenario():
        async with Rig(prefill=StreamingPrefill) as rig:
            flow = rig.submit("early")
            await until(lambda: flow.output_ids == [FIRST_TOKEN], "the first token is delivered")
            assert flow.stage is PRE and _tokens(flow) == [FIRST_TOKEN] and flow.ttft_ms > 0
            rig.finish(flow, [9])  # the decode worker's step comes before the prefill worker's final result
            await until(lambda: len(flow.early) == 1, "the decode event waits for the final result")
            assert flow.output_ids == [FIRST_TOKEN]
            rig.prefill.acks.set()
            await until(lambda: flow.ended, "the flow ends")
            assert flow.output_ids == [FIRST_TOKEN, 9] and [o.finish_reason for o in end_events(flow)] == ["length"]
            assert flow.transfer_bytes == 1000 and not flow.first_early
            assert rig.pool.prefill[0].prefill_stream and rig.prefill.asked == []  # (Prefill never called)
            await settle(rig)

    asyncio.run(scenario())


def test_a_transfer_that_fails_after_the_first_token_ends_the_request_unavailable():
    async def scenario():
        async with Rig(prefill=StreamingPrefill) as rig:
            rig.prefill.bad_transfer.add("lost-state")
            flow = rig.submit("lost-state")
            await until(lambda: flow.output_ids == [FIRST_TOKEN], "the first token is delivered")
            rig.prefill.acks.set()
            await until(lambda: flow.ended, "the flow ends")
            (outcome,) = end_events(flow)
            assert outcome.code == grpc.StatusCode.UNAVAILABLE and "state transfer failed" in outcome.message
            assert flow.output_ids == [FIRST_TOKEN]
            await until(lambda: "lost-state" in rig.decode.released, "its reservation is released")
            await settle(rig)

    asyncio.run(scenario())


def test_a_prefill_stream_lost_after_the_first_token_moves_the_request_which_resumes_after_it():
    async def scenario():
        async with Rig(prefill=StreamingPrefill) as rig:
            rig.prefill.fail_after_first = grpc.StatusCode.UNAVAILABLE
            rig.prefill.acks.set()
            flow = rig.submit("moved")
            await until(lambda: flow.attempt == 1 and flow.stage is DEC, "the next attempt decodes")
            first, second = rig.prefill.streamed
            assert (first.request_id, list(first.output_ids)) == ("moved", [])
            assert (second.request_id, list(second.output_ids)) == ("moved@1", [FIRST_TOKEN])  # resumes after it
            rig.finish(flow, [9])
            await until(lambda: flow.ended, "the flow ends")
            assert flow.output_ids == [FIRST_TOKEN, FIRST_TOKEN, 9]
            assert [o.finish_reason for o in end_events(flow)] == ["length"]
            await settle(rig)

    asyncio.run(scenario())


def test_a_prefill_worker_without_prefill_stream_is_asked_with_prefill():
    async def scenario():
        async with Rig() as rig:  # ScriptedPrefill: PrefillStream is UNIMPLEMENTED
            flows = [rig.submit("plain-1")]
            await until(lambda: flows[0].stage is DEC, "the first flow decodes")
            assert not rig.pool.prefill[0].prefill_stream
            flows.append(rig.submit("plain-2"))
            await until(lambda: flows[1].stage is DEC, "the second flow decodes")
            assert rig.prefill.asked == ["plain-1", "plain-2"]
            for flow in flows:
                rig.finish(flow, [9])
            await until(lambda: all(f.stage is END for f in flows), "both end")
            assert all(f.output_ids == [FIRST_TOKEN, 9] for f in flows)
            await settle(rig)

    asyncio.run(scenario())
