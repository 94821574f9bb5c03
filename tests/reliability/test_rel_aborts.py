"""Aborts at every phase of a request, by client cancel and by the Abort RPC (real processes on 127.0.0.1):
queued in the router, in prefill, in the P→D transfer, decoding, and after the last token.

Slow phases come from fault points: a prefill worker that sleeps 1 s before each step, one whose transfers
leave 2 s late, and a decode worker that sleeps 50 ms before each step. After each abort: the aborted
request ended exactly once (the router counts one "cancelled" for a client cancel, one "abort" for the Abort
RPC, whose stream ends with one complete of finish_reason "abort"), the router has nothing in flight, every
page and slot is free on both workers, and the worker that held the request serves the next one.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections import Counter
from pathlib import Path

import grpc
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from rel_helpers import (  # noqa: E402
    Fleet,
    channel,
    collect,
    generate_request,
    outcome_of,
    reference,
    router_outcomes,
    run,
    stub_of,
    wait_all_free,
    wait_worker_free,
    worker_stats,
)

from sparsepd.proto import sglang_scheduler_pb2 as pb  # noqa: E402

TRANSFER_DELAY_S = 2.0
PHASES = ["queued", "prefill", "transfer", "decoding", "finished"]


@pytest.fixture(scope="module")
def fleet():
    fleet = Fleet()
    try:
        fleet.workers(
            decode=("decode", {"SPARSEPD_FAULTS": "decode.step=delay:0.05"}, []),
            p_slow=("prefill", {"SPARSEPD_FAULTS": "prefill.step=delay:1"}, []),
            p_transfer=("prefill", {"SPARSEPD_TRANSFER_FAULT": f"delay:{TRANSFER_DELAY_S}"}, []),
            p_plain=("prefill", None, []),
        )
        decode = [fleet["decode"]]
        fleet.routers(r_slow=([fleet["p_slow"]], decode, []), r_transfer=([fleet["p_transfer"]], decode, []),
                      r_plain=([fleet["p_plain"]], decode, []))
        yield fleet
    finally:
        fleet.stop_all()


async def _info(stub) -> dict:
    """The router's queue length, requests in flight, and prompt tokens in batches sent to prefill workers."""
    info = await stub.GetServerInfo(pb.GetServerInfoRequest())
    workers = info.scheduler_info["workers"]
    return {"queue": info.scheduler_info["queue_length"], "in_flight": info.scheduler_info["in_flight"],
            "sent_tokens": sum(w["queued_tokens"] for w in workers if w["role"] == "prefill")}


async def _until(check, what: str, timeout: float = 15.0) -> None:
    """Poll `check()` → (ok, what it saw) every 20 ms until ok."""
    deadline = time.monotonic() + timeout
    while not (seen := await check())[0]:
        assert time.monotonic() < deadline, f"never got to: {what} (last seen: {seen[1]})"
        await asyncio.sleep(0.02)


async def _reach(phase: str, fleet: Fleet, stub, call) -> list:
    """Wait until the request of `call` is past the router's queue and in `phase`; return the responses read."""
    if phase == "prefill":
        async def in_engine():
            s = await worker_stats(fleet["p_slow"])
            return s.running + s.waiting > 0, s
        await _until(in_engine, "the request in the prefill worker's engine")
    elif phase == "transfer":
        async def reserved():
            s = await worker_stats(fleet["decode"])
            return s.waiting == 1, s
        await _until(reserved, "a reservation on the decode worker")
        await asyncio.sleep(0.8)  # its prefill takes ~0.1 s; the state leaves TRANSFER_DELAY_S later (checked below)
    elif phase == "decoding":
        return [await call.read() for _ in range(3)]  # the prefill worker's token, then two decode steps
    elif phase == "finished":
        responses = []
        while not responses or not responses[-1].HasField("complete"):
            responses.append(await call.read())
        return responses
    return []


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("method", ["cancel", "abort"])
def test_abort_at_every_phase(fleet, method, phase):
    router = fleet["r_slow" if phase in ("queued", "prefill") else "r_transfer" if phase == "transfer" else "r_plain"]
    prefill = fleet[{"r_slow": "p_slow", "r_transfer": "p_transfer", "r_plain": "p_plain"}[router.name]]
    rid = f"{method}-{phase}"
    prompt, next_prompt = [256, *rid.encode()], [256, *f"next after {rid}".encode()]
    max_new = 4 if phase == "finished" else 200
    before, prefill_before = router_outcomes(router), run(worker_stats(prefill))

    async def main():
        async with channel(router.ready["grpc"]) as ch:
            stub = stub_of(ch)
            fillers, sent = [], 0
            if phase == "queued":  # two batches in flight fill the slow prefill worker; the third request queues
                for i in range(2):
                    filler = [256, *f"filler {rid} {i}".encode()]
                    fillers.append(asyncio.ensure_future(outcome_of(stub, generate_request(
                        filler, 2, request_id=f"{rid}-filler-{i}"))))
                    sent += len(filler)
                    await _until(lambda n=i + 1, sent=sent: _queue_is(stub, 0, n, sent),
                                 f"filler {i} sent to the prefill worker in a batch of its own")
            call = stub.Generate(generate_request(prompt, max_new, stream=True, request_id=rid), timeout=60)
            if phase == "queued":
                await _until(lambda: _queue_is(stub, 1, 3, sent), "the request waiting in the router's queue")
            responses = await _reach(phase, fleet, stub, call)
            aborted = None
            if method == "cancel":
                call.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await call.read()
                status = await call.code()
            else:
                aborted = await stub.Abort(pb.AbortRequest(request_id=rid))
                while (response := await call.read()) != grpc.aio.EOF:
                    responses.append(response)
                status = await call.code()
            filled = await asyncio.gather(*fillers)
            loads = await wait_all_free(stub, timeout=20)
            nxt = await outcome_of(stub, generate_request(next_prompt, 3, request_id=rid))
            return responses, aborted, status, filled, loads, nxt

    responses, aborted, status, filled, loads, nxt = run(main())
    completes = [r.complete for r in responses if r.HasField("complete")]
    streamed = [t for r in responses if r.HasField("chunk") for t in r.chunk.token_ids]
    if phase == "finished":  # the abort came too late to change anything
        assert len(completes) == 1 and list(completes[0].output_ids) == reference(prompt, max_new)
        assert status == (grpc.StatusCode.CANCELLED if method == "cancel" else grpc.StatusCode.OK)
        assert aborted is None or not aborted.success
    elif method == "cancel":
        assert status == grpc.StatusCode.CANCELLED and not completes
    else:
        assert status == grpc.StatusCode.OK and aborted.success, aborted
        assert len(completes) == 1 and responses[-1].HasField("complete"), responses  # one complete, last
        assert completes[0].finish_reason == "abort" and list(completes[0].output_ids) == streamed
    if phase == "decoding":
        assert 3 <= len(streamed) < max_new and streamed == reference(prompt, len(streamed))
    elif phase == "transfer":  # the first token goes out as soon as it is drawn, before the state's acknowledgement
        assert streamed in ([], reference(prompt, 1)), streamed
    elif phase != "finished":
        assert streamed == []
    assert all(f[0] == "length" for f in filled), filled
    ended = Counter({"length": 1 + 2 * (phase == "queued")})  # the next request, the fillers
    ended["length" if phase == "finished" else "cancelled" if method == "cancel" else "abort"] += 1
    assert router_outcomes(router) - before == ended
    assert all(x.free_pages == x.num_pages and x.free_slots == x.num_slots for x in loads.loads)
    assert nxt == ("length", "", reference(next_prompt, 3))  # the same request id again: nothing left of it
    after = run(wait_worker_free(prefill))
    # Every request of the test shipped one accepted state, except the aborted one unless it was past its
    # prefill: aborted in the transfer, its state was refused (the reservation was gone).
    shipped = 1 + 2 * (phase == "queued") + (phase in ("decoding", "finished"))
    assert after.transfers_ok - prefill_before.transfers_ok == shipped
    assert after.transfers_failed - prefill_before.transfers_failed == (phase == "transfer")


async def _queue_is(stub, queued: int, in_flight: int, sent_tokens: int) -> tuple[bool, dict]:
    info = await _info(stub)
    return info == {"queue": queued, "in_flight": in_flight, "sent_tokens": sent_tokens}, info


def test_abort_of_unknown_or_finished_ids_is_harmless(fleet):
    router = fleet["r_plain"]
    prompt = [256, *b"finished before the abort"]

    async def main():
        async with channel(router.ready["grpc"]) as ch:
            stub = stub_of(ch)
            unknown = await stub.Abort(pb.AbortRequest(request_id="never-seen"))
            empty = await stub.Abort(pb.AbortRequest(request_id=""))
            _, done = await collect(stub, generate_request(prompt, 3, request_id="done-then-aborted"))
            finished = await stub.Abort(pb.AbortRequest(request_id="done-then-aborted"))
            again = await outcome_of(stub, generate_request(prompt, 3, request_id="done-then-aborted"))
            await wait_all_free(stub)
            return unknown, empty, done, finished, again

    unknown, empty, done, finished, again = run(main())
    assert not unknown.success and not empty.success and not finished.success
    assert "not in flight" in unknown.message and "not in flight" in finished.message
    assert list(done.output_ids) == reference(prompt, 3)
    assert again == ("length", "", reference(prompt, 3))  # the id is free again; nothing was left behind
