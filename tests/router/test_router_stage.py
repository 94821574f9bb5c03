"""A flow's stage machine (router/stage.py) driven through the real dispatcher against scripted workers: real
grpc.aio servers on 127.0.0.1 that serve the worker control API (worker.proto) and answer when the test says.
Every allowed transition is taken, an abort and a move to other workers from every stage release exactly what
that stage held (a decode reservation, a prefill in flight), no transition is refused on the way, each flow
ends with exactly one end event; a transition the table does not allow is refused and logged with the
request id.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter

import grpc
import pytest

from sparsepd.proto import worker_pb2, worker_pb2_grpc
from sparsepd.router.dispatch import Dispatcher
from sparsepd.router.flow import Flow, Outcome
from sparsepd.router.params import RequestSpec
from sparsepd.router.stage import HOLDS_DECODE, TRANSITIONS, Stage, allowed
from sparsepd.router.workers import WorkerPool

Q, RING, RED, PRE, DEC, END = (Stage.QUEUED, Stage.RESERVING, Stage.RESERVED, Stage.PREFILLING, Stage.DECODING,
                               Stage.ENDED)
LIVE = (Q, RING, RED, PRE, DEC)
FIRST_TOKEN = 7


class ScriptedDecode(worker_pb2_grpc.DecodeWorkerServicer):
    """A decode worker whose Reserve waits while its request id has a closed gate, refuses the ids in
    `no_room`/`invalid`, and whose token stream sends what the test puts on `steps` (None ends the stream)."""

    def __init__(self):
        self.gates: dict[str, asyncio.Event] = {}
        self.no_room: set[str] = set()
        self.invalid: set[str] = set()
        self.asked: list[str] = []
        self.granted: list[str] = []
        self.released: list[str] = []
        self.steps: asyncio.Queue = asyncio.Queue()

    async def Reserve(self, request, context):
        self.asked.append(request.request_id)
        gate = self.gates.get(request.request_id)
        if gate is not None:
            await gate.wait()
        if request.request_id in self.no_room:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "no free page")
        if request.request_id in self.invalid:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompt_len 4 is not what the test wants")
        self.granted.append(request.request_id)
        return worker_pb2.ReserveResponse(ticket=worker_pb2.Ticket(transfer_id=request.request_id, page_ids=[1]))

    async def Release(self, request, context):
        self.released.append(request.request_id)
        return worker_pb2.ReleaseResponse(found=True)

    async def StreamTokens(self, request, context):
        while (step := await self.steps.get()) is not None:
            yield step

    async def Health(self, request, context):
        return worker_pb2.HealthResponse(serving=True, role="decode")

    async def Stats(self, request, context):
        return worker_pb2.StatsResponse(role="decode", num_pages=64, free_pages=64, num_slots=8, free_slots=8)


class ScriptedPrefill(worker_pb2_grpc.PrefillWorkerServicer):
    """A prefill worker that answers a batch once `gate` is open: every request ok with FIRST_TOKEN, or the whole
    call failed with `fail` (once)."""

    def __init__(self):
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail: grpc.StatusCode | None = None
        self.asked: list[str] = []
        self.batches: list[list[str]] = []  # the request ids of each Prefill call, in arrival order
        self.released: list[str] = []

    async def Prefill(self, batch, context):
        self.asked += [r.request_id for r in batch.requests]
        self.batches.append([r.request_id for r in batch.requests])
        await self.gate.wait()
        if self.fail is not None:
            code, self.fail = self.fail, None
            await context.abort(code, "the scripted prefill failed")
        return worker_pb2.PrefillResponse(results=[
            worker_pb2.PrefillResult(request_id=r.request_id, ok=True, first_token=FIRST_TOKEN)
            for r in batch.requests])

    async def Release(self, request, context):
        self.released.append(request.request_id)
        return worker_pb2.ReleaseResponse(found=True)

    async def Health(self, request, context):
        return worker_pb2.HealthResponse(serving=True, role="prefill")

    async def Stats(self, request, context):
        return worker_pb2.StatsResponse(role="prefill", num_pages=64, free_pages=64, num_slots=8, free_slots=8)


class Rig:
    """The scripted workers, a worker pool and a started dispatcher; `finished` are the ids a decode event ended."""

    def __init__(self, batch_wait_s: float = 0.0, prefill: type[ScriptedPrefill] | None = None):
        self.batch_wait_s, self.prefill_cls = batch_wait_s, prefill or ScriptedPrefill

    async def __aenter__(self) -> Rig:
        self.prefill, self.decode = self.prefill_cls(), ScriptedDecode()
        self.servers, addresses = [], []
        for servicer, add in ((self.prefill, worker_pb2_grpc.add_PrefillWorkerServicer_to_server),
                              (self.decode, worker_pb2_grpc.add_DecodeWorkerServicer_to_server)):
            server = grpc.aio.server()
            add(servicer, server)
            addresses.append(f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}")
            await server.start()
            self.servers.append(server)
        self.pool = WorkerPool([addresses[0]], [addresses[1]], poll_s=0.05)
        self.d = Dispatcher(self.pool, batch_wait_s=self.batch_wait_s, max_migrations=3)
        self.finished: set[str] = set()
        await self.pool.start()
        self.d.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.d.stop()
        await self.pool.close()
        for server in self.servers:
            await server.stop(0)

    def submit(self, request_id: str) -> Flow:
        spec = RequestSpec(request_id, [256, 1, 2, 3], worker_pb2.SamplingParams(max_new_tokens=8, seed=5), 8)
        return self.d.submit(spec)

    def finish(self, flow: Flow, tokens: list[int]) -> None:
        """The decode worker ends the flow's current attempt (its last step: finish_reason "length")."""
        self.finished.add(flow.worker_id)
        event = worker_pb2.TokenEvent(request_id=flow.worker_id, token_ids=tokens, finish_reason="length")
        self.decode.steps.put_nowait(worker_pb2.StepBatch(step=1, events=[event]))


async def until(condition, what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        await asyncio.sleep(0.005)


async def reach(rig: Rig, request_id: str, stage: Stage) -> Flow:
    """A new flow held at `stage` (QUEUED: before the batcher has run; the caller acts before it awaits)."""
    decode, prefill = rig.decode, rig.prefill
    if stage is RING:
        decode.gates[request_id] = asyncio.Event()
    if stage is PRE:
        prefill.gate.clear()
    flow = rig.submit(request_id)
    if stage is RED:  # a second request in the same batch whose Reserve waits: the batch's Prefill waits too
        decode.gates[f"{request_id}-holder"] = asyncio.Event()
        rig.holder = rig.submit(f"{request_id}-holder")
        await until(lambda: f"{request_id}-holder" in decode.asked, "the holder's Reserve is out")
    if stage is not Q:
        await until(lambda: flow.stage is stage, f"{request_id} is {stage.value}")
    if stage is PRE:
        await until(lambda: request_id in prefill.asked, f"the Prefill of {request_id} is out")
    return flow


async def release_holder(rig: Rig, request_id: str) -> None:
    """Abort the RESERVED scenario's second request, still reserving, and let its Reserve answer: the grant that
    comes for an ended flow is given back."""
    holder = f"{request_id}-holder"
    rig.d.abort(holder)
    rig.decode.gates[holder].set()
    await until(lambda: holder in rig.decode.released, "the holder's late grant is released")


def end_events(flow: Flow) -> list[Outcome]:
    """The end events on the flow's stream (the client sees exactly one, last)."""
    events = []
    while not flow.events.empty():
        events.append(flow.events.get_nowait())
    assert events and events[-1][0] == "end", events
    return [payload for kind, payload in events if kind == "end"]


async def settle(rig: Rig) -> None:
    """Every flow ended and every Release answered; each reservation given back once, or ended by the worker."""
    await until(lambda: not rig.d.flows and not rig.d.queue and rig.d.reservations.releasing == 0, "all is idle")
    released = Counter(rig.decode.released)
    assert all(n == 1 for n in released.values()), released
    assert set(rig.decode.granted) == set(released) | (rig.finished & set(rig.decode.granted)), (
        rig.decode.granted, released, rig.finished)
    assert not set(released) & rig.finished


@pytest.fixture
def transitions(monkeypatch) -> list[tuple[str, Stage, Stage, bool]]:
    """Every Flow.to call: (request id, from, to, allowed)."""
    seen = []
    original = Flow.to

    def to(self: Flow, stage: Stage) -> bool:
        old = self.stage
        ok = original(self, stage)
        seen.append((self.request_id, old, stage, ok))
        return ok

    monkeypatch.setattr(Flow, "to", to)
    return seen


async def abort_from(rig: Rig, stage: Stage) -> None:
    request_id = f"abort-{stage.value}"
    flow = await reach(rig, request_id, stage)
    assert rig.d.abort(request_id)
    assert flow.stage is END and [o.finish_reason for o in end_events(flow)] == ["abort"]
    if stage is RING:  # the Reserve answers after the abort: its grant is given back at once
        rig.decode.gates[request_id].set()
    if stage in HOLDS_DECODE or stage is RING:
        await until(lambda: request_id in rig.decode.released, f"the reservation of {request_id} is released")
    if stage is PRE:
        await until(lambda: request_id in rig.prefill.released, "the prefill in flight is released")
        rig.prefill.gate.set()
    if stage is RED:
        await release_holder(rig, request_id)
    await settle(rig)
    assert request_id not in rig.prefill.released or stage is PRE
    assert (request_id in rig.decode.granted) == (stage is not Q)


async def migrate_from(rig: Rig, stage: Stage) -> None:
    """Move the flow (as a lost worker does) from `stage`: back to QUEUED at the queue's head, what it held
    released, and its next attempt runs to the end under `<id>@1`."""
    request_id = f"move-{stage.value}"
    flow = await reach(rig, request_id, stage)
    rig.d._migrate(flow, "decode", "the test moved it")
    assert flow.stage is Q and flow.attempt == 1 and rig.d.queue[0] is flow and flow.worker_id == f"{request_id}@1"
    if stage is RING:
        rig.decode.gates[request_id].set()  # the old attempt's late grant: given back, not taken
    if stage is PRE:
        await until(lambda: request_id in rig.prefill.released, "the prefill in flight is released")
        rig.prefill.gate.set()
    if stage is RED:
        await release_holder(rig, request_id)
    await until(lambda: flow.stage is DEC and flow.attempt == 1, "the next attempt decodes")
    rig.finish(flow, [9])
    await until(lambda: flow.ended, "the moved flow ends")
    assert [o.finish_reason for o in end_events(flow)] == ["length"]
    assert flow.output_ids[-1] == 9 and f"{request_id}@1" not in rig.decode.released
    await settle(rig)
    assert (request_id in rig.decode.released) == (stage is not Q)  # what the first attempt held, given back


async def stream_breaks(rig: Rig, stage: Stage) -> None:
    """The decode worker's token stream ends while a flow is at `stage`: the flow is moved and ends elsewhere."""
    request_id = f"stream-{stage.value}"
    flow = await reach(rig, request_id, stage)
    rig.decode.steps.put_nowait(None)  # the token stream ends: the worker counts as lost until a poll
    await until(lambda: flow.attempt == 1, f"{request_id} is moved")
    if stage is PRE:
        rig.prefill.gate.set()
    if stage is RED:
        await release_holder(rig, request_id)
    await until(lambda: flow.stage is DEC and flow.attempt == 1, f"{request_id} decodes again")
    rig.finish(flow, [9])
    await until(lambda: flow.ended, f"{request_id} ends")
    assert [o.finish_reason for o in end_events(flow)] == ["length"] and flow.outcome.code is None
    await settle(rig)


async def lost_workers(rig: Rig) -> None:
    """The real triggers: a decode worker's stream breaks while a flow is reserved, prefilling or decoding; a
    prefill worker fails a batch as lost (UNAVAILABLE: moved) or not (INTERNAL: the flow fails)."""
    for stage in (RED, PRE, DEC):
        await stream_breaks(rig, stage)

    rig.prefill.fail = grpc.StatusCode.UNAVAILABLE
    flow = rig.submit("prefill-lost")
    await until(lambda: flow.stage is DEC and flow.attempt == 1, "the flow moved off the lost prefill decodes")
    assert "prefill worker" in flow.lost
    rig.finish(flow, [9])
    await until(lambda: flow.ended, "prefill-lost ends")
    await settle(rig)

    rig.prefill.fail = grpc.StatusCode.INTERNAL
    flow = rig.submit("prefill-failed")
    await until(lambda: flow.ended, "prefill-failed ends")
    (outcome,) = end_events(flow)
    assert outcome.code == grpc.StatusCode.UNAVAILABLE and "the scripted prefill failed" in outcome.message
    await until(lambda: "prefill-failed" in rig.decode.released, "its reservation is released")
    await settle(rig)


async def refusals(rig: Rig) -> None:
    """No decode worker has room (nothing else holds pages: it can never fit) and a request the decode worker
    refuses as invalid: both end from reserving."""
    rig.decode.no_room.add("no-room")
    flow = rig.submit("no-room")
    await until(lambda: flow.ended, "no-room ends")
    assert end_events(flow)[0].code == grpc.StatusCode.RESOURCE_EXHAUSTED
    rig.decode.invalid.add("invalid")
    flow = rig.submit("invalid")
    await until(lambda: flow.ended, "invalid ends")
    assert end_events(flow)[0].code == grpc.StatusCode.INVALID_ARGUMENT
    await settle(rig)


def test_every_transition_abort_and_move_from_every_stage(transitions):
    async def scenario() -> None:
        async with Rig() as rig:
            for stage in LIVE:
                await abort_from(rig, stage)
                await migrate_from(rig, stage)
            await lost_workers(rig)
            await refusals(rig)
            flow = rig.submit("plain")
            await until(lambda: flow.stage is DEC, "plain decodes")
            rig.finish(flow, [9])
            await until(lambda: flow.ended, "plain ends")
            assert flow.output_ids == [FIRST_TOKEN, 9] and end_events(flow)[0].finish_reason == "length"
            await settle(rig)

    asyncio.run(scenario())
    refused = [t for t in transitions if not t[3]]
    assert not refused, refused  # no race on the way
    taken = {(old, new) for _, old, new, ok in transitions if ok}
    table = {(old, new) for old, targets in TRANSITIONS.items() for new in targets}
    assert taken == table, f"never taken: {table - taken}; outside the table: {taken - table}"


def test_a_transition_the_table_does_not_allow_is_refused_and_logged(caplog):
    spec = RequestSpec("r-illegal", [256, 1], worker_pb2.SamplingParams(max_new_tokens=2), 2)
    for old in Stage:
        for new in Stage:
            flow = Flow(spec)
            flow.stage = old  # (set directly: the stage under test)
            caplog.clear()
            with caplog.at_level(logging.ERROR, logger="sparsepd.router"):
                ok = flow.to(new)
            assert ok == allowed(old, new), (old, new)
            assert flow.stage is (new if ok else old)
            if not ok:
                (record,) = caplog.records
                assert record.getMessage().startswith(f"illegal stage transition {old.value} -> {new.value} refused")
                assert record.request_id == "r-illegal"
            else:
                assert not caplog.records
    assert not allowed(END, Q) and not allowed(Q, DEC) and not allowed(DEC, PRE)


def test_a_late_answer_for_an_ended_flow_changes_nothing(caplog):
    """A prefill result or a decode event that arrives after the flow ended (aborted meanwhile) is ignored, not
    taken as a transition out of ENDED."""
    async def scenario() -> None:
        async with Rig() as rig:
            flow = await reach(rig, "late", PRE)
            rig.d.abort("late")
            rig.prefill.gate.set()  # its prefill answers now, for an ended flow
            event = worker_pb2.TokenEvent(request_id="late", token_ids=[3], finish_reason="length")
            rig.decode.steps.put_nowait(worker_pb2.StepBatch(step=1, events=[event]))
            await until(lambda: "late" in rig.prefill.released and "late" in rig.decode.released, "released")
            await settle(rig)
            assert flow.stage is END and flow.output_ids == [] and len(end_events(flow)) == 1

    with caplog.at_level(logging.ERROR, logger="sparsepd.router"):
        asyncio.run(scenario())
    assert not [r for r in caplog.records if "illegal" in r.getMessage()]


def test_an_idle_prefill_worker_gets_a_request_without_the_batch_wait():
    """The batch wait is for company while the prefill worker is busy: a request that finds it idle goes out at
    once (with a wait of a minute, it reaches the worker within the test's 10 s or the test fails), and ends."""
    async def scenario() -> None:
        async with Rig(batch_wait_s=60.0) as rig:
            flow = rig.submit("alone")
            await until(lambda: rig.prefill.batches == [["alone"]], "the lone request's Prefill is out")
            assert flow.stage is DEC
            rig.finish(flow, [1])
            await settle(rig)
            assert [o.finish_reason for o in end_events(flow)] == ["length"]

    asyncio.run(scenario())


def test_a_busy_prefill_worker_gets_the_requests_of_the_batch_wait_in_one_batch():
    """While a batch is in flight on the prefill worker, the next one waits for company: two requests that come
    one after the other go out together once the wait is over, the first alone before them."""
    async def scenario() -> None:
        async with Rig(batch_wait_s=0.5) as rig:
            first = await reach(rig, "first", PRE)  # held by the worker: it is busy now
            second = rig.submit("second")
            await until(lambda: second.stage is RING, "the second request is taken into a batch")
            third = rig.submit("third")
            await until(lambda: len(rig.prefill.batches) == 2, "the second batch's Prefill is out")
            assert rig.prefill.batches == [["first"], ["second", "third"]]
            rig.prefill.gate.set()
            for flow in (first, second, third):
                await until(lambda f=flow: f.stage is DEC, f"{flow.request_id} is decoding")
                rig.finish(flow, [1])
            await settle(rig)
            assert all(len(end_events(f)) == 1 for f in (first, second, third))

    asyncio.run(scenario())
