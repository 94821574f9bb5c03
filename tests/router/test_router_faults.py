"""Overload and lost workers through the public API: a full admission queue answers RESOURCE_EXHAUSTED; a
killed decode worker that no other can replace: its request in flight waits --worker-wait for a decode worker
to come back, then fails UNAVAILABLE naming the lost one, the health checks turn NOT_SERVING, new requests
are refused UNAVAILABLE, and the prefill worker's pages still come back. Every request ends exactly once."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

sys.path.insert(0, str(Path(__file__).parent))
from router_helpers import (  # noqa: E402
    WORKER_ARGS,
    channel,
    collect,
    generate_request,
    run,
    start_router,
    stub_of,
    wait_all_free,
)

from sparsepd.deploy.launch import start, stop  # noqa: E402
from sparsepd.proto import sglang_scheduler_pb2 as pb  # noqa: E402


async def _outcome(stub, request) -> str:
    try:
        _, done = await collect(stub, request)
        return done.finish_reason
    except grpc.aio.AioRpcError as exc:
        return f"{exc.code().name}: {exc.details()}"


def test_full_admission_queue_is_resource_exhausted(deployment):
    router = start_router(deployment["prefill"], deployment["decode"], "--max-queue", "1", "--batch-tokens", "4")
    try:
        async def main():
            async with channel(router.ready["grpc"]) as ch:
                stub = stub_of(ch)
                outcomes = await asyncio.gather(*[_outcome(stub, generate_request([256, *f"queue {i:02d}".encode()], 4))
                                                  for i in range(24)])
                loads = await stub.GetLoads(pb.GetLoadsRequest())
                return outcomes, loads

        outcomes, loads = run(main())
    finally:
        stop(router)
    refused = [o for o in outcomes if o.startswith("RESOURCE_EXHAUSTED")]
    assert refused and all("admission queue is full" in o for o in refused), outcomes
    assert all(o == "length" for o in outcomes if o not in refused), outcomes
    assert all(x.free_pages == x.num_pages for x in loads.loads)


def test_requests_put_back_for_room_never_take_the_queue_past_its_cap(deployment):
    """--max-queue bounds the requests admitted and not yet sent to prefill, those put back at the head for want
    of decode room included (they were counted all along). 40 clients keep the queue full (a refused request is
    sent again 5 ms later) with requests of 16 pages each on a decode worker of 192, and batches take the whole
    queue, so requests are put back again and again; yet the router never holds more than the cap waiting, every
    refusal says "8 of 8" and every admitted request completes."""
    cap, clients, each = 8, 40, 2
    router = start_router(deployment["prefill"], deployment["decode"], "--max-queue", str(cap), "--batch-tokens",
                          "4096")
    try:
        async def main():
            async with channel(router.ready["grpc"]) as ch:
                stub, seen, outcomes, done = stub_of(ch), [], [], asyncio.Event()

                async def watch():
                    while not done.is_set():
                        info = (await stub.GetServerInfo(pb.GetServerInfoRequest())).scheduler_info
                        seen.append((int(info["queue_length"]), int(info["waiting"])))
                        await asyncio.sleep(0.002)

                async def client(c: int):
                    for i in range(each):
                        prompt = [256, *f"cap {c:02d} {i} ".encode() * 30]  # 241 ids: 16 pages of 16
                        while (outcome := await _outcome(stub, generate_request(prompt, 16))).startswith(
                                "RESOURCE_EXHAUSTED"):
                            outcomes.append(outcome)
                            await asyncio.sleep(0.005)
                        outcomes.append(outcome)

                watcher = asyncio.create_task(watch())
                await asyncio.gather(*[client(c) for c in range(clients)])
                done.set()
                await watcher
                await wait_all_free(stub)
                return outcomes, seen

        outcomes, seen = run(main())
        with urllib.request.urlopen(router.ready["metrics"], timeout=5) as r:
            metrics = r.read().decode()
    finally:
        stop(router)
    refused = [o for o in outcomes if o.startswith("RESOURCE_EXHAUSTED")]
    counts = {re.search(r"\((\d+) of (\d+) requests waiting\)", o).groups() for o in refused}
    assert refused and counts == {(str(cap), str(cap))}, counts
    assert [o for o in outcomes if o not in refused] == ["length"] * clients * each, outcomes
    put_back = float(re.search(r"^sparsepd_router_requeued_total (\S+)$", metrics, re.M).group(1))
    assert put_back > 0, "no request waited for decode room: the load did not test the bound"
    assert max(q for q, _ in seen) <= cap and max(w for _, w in seen) <= cap, (max(seen), len(seen))


def test_killed_decode_worker_fails_requests_with_unavailable_and_frees_prefill(deployment):
    decode = start("decode-doomed", ["decode-worker", *WORKER_ARGS])
    router = start_router(deployment["prefill"], decode.ready["grpc"], "--worker-wait", "2")
    try:
        async def main():
            async with channel(router.ready["grpc"]) as ch:
                stub = stub_of(ch)
                call = stub.Generate(generate_request([256, *b"doomed"], 500, stream=True))
                first = await call.read()
                os.kill(decode.pid, signal.SIGKILL)  # mid-stream: its token stream breaks (a SIGTERM would drain
                # it: a 500-token request on a quiet host then ends within the drain, and nothing fails)
                rest = []
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    while (response := await call.read()) != grpc.aio.EOF:
                        rest.append(response)
                deadline = time.monotonic() + 10
                while (await stub.HealthCheck(pb.HealthCheckRequest())).healthy:
                    assert time.monotonic() < deadline, "still healthy without a decode worker"
                    await asyncio.sleep(0.1)
                std = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""))
                with pytest.raises(grpc.aio.AioRpcError) as new:
                    await collect(stub, generate_request([256, 1, 2], 4))
                loads = await stub.GetLoads(pb.GetLoadsRequest())
                return first, rest, err.value, std, new.value, loads

        first, rest, err, std, new, loads = run(main())
    finally:
        stop(router)
        stop(decode)
    assert first.HasField("chunk") and all(r.HasField("chunk") for r in rest)
    assert err.code() == grpc.StatusCode.UNAVAILABLE, err
    assert f"decode worker {decode.ready['grpc']} went away" in err.details(), err  # the lost one, then the wait
    assert re.search(r"then no decode worker is alive for \d+ s", err.details()), err
    assert std.status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert new.code() == grpc.StatusCode.UNAVAILABLE and "no decode worker is alive" in new.details()
    prefill = next(x for x in loads.loads if x.disaggregation.mode == "prefill")
    assert prefill.alive and prefill.free_pages == prefill.num_pages and prefill.free_slots == prefill.num_slots
