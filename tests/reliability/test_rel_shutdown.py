"""Graceful shutdown on SIGTERM (real processes on 127.0.0.1; the decode workers sleep 50 ms per step so
requests last long enough to be caught in flight):

- the router: requests in flight finish within --drain-timeout with the reference tokens, new ones are
  refused UNAVAILABLE, it exits 0; with a short --drain-timeout, long requests end UNAVAILABLE instead of
  hanging, it exits 0 and the workers get every page back;
- a decode worker: its running request finishes (within its --drain-timeout), then it exits 0;
- `sparsepd serve`: a request in flight finishes, it exits 0, and every process it started is gone.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

sys.path.insert(0, str(Path(__file__).parent))
from rel_helpers import (  # noqa: E402
    Fleet,
    channel,
    collect,
    generate_request,
    outcome_of,
    reference,
    run,
    stub_of,
    wait_worker_free,
)

from sparsepd.deploy.launch import start, stop  # noqa: E402
from sparsepd.proto import sglang_scheduler_pb2 as pb  # noqa: E402

SLOW_DECODE = {"SPARSEPD_FAULTS": "decode.step=delay:0.05"}


@pytest.fixture(scope="module")
def fleet():
    fleet = Fleet()
    try:
        fleet.workers(prefill=("prefill", None, []), decode=("decode", SLOW_DECODE, []),
                      decode_term=("decode", SLOW_DECODE, ["--drain-timeout", "20"]))
        p, d = [fleet["prefill"]], [fleet["decode"]]
        fleet.routers(router_drain=(p, d, ["--drain-timeout", "20"]), router_cut=(p, d, ["--drain-timeout", "1"]),
                      router_dt=(p, [fleet["decode_term"]], []))
        yield fleet
    finally:
        fleet.stop_all()


async def _first_chunks(stub, prompts: list[list[int]], max_new: int, tag: str):
    """Start one stream per prompt and read each one's first chunk: (calls, the tokens of those chunks)."""
    calls = [stub.Generate(generate_request(p, max_new, stream=True, request_id=f"{tag}-{i}"), timeout=60)
             for i, p in enumerate(prompts)]
    firsts = []
    for call in calls:
        response = await call.read()
        assert response.HasField("chunk"), response
        firsts.append(list(response.chunk.token_ids))
    return calls, firsts


async def _rest(call) -> tuple[list[int], str]:
    """The tokens of the remaining chunks and the complete's finish reason (raises AioRpcError on a status)."""
    tokens, finish = [], None
    while (response := await call.read()) != grpc.aio.EOF:
        assert finish is None, "a response after the complete"
        if response.HasField("complete"):
            finish = response.complete.finish_reason
        else:
            tokens += response.chunk.token_ids
    return tokens, finish


async def _until_not_serving(ch) -> None:
    health = health_pb2_grpc.HealthStub(ch)
    deadline = time.monotonic() + 10
    while (await health.Check(health_pb2.HealthCheckRequest())).status == health_pb2.HealthCheckResponse.SERVING:
        assert time.monotonic() < deadline, "still SERVING after SIGTERM"
        await asyncio.sleep(0.02)


def test_router_sigterm_drains_requests_in_flight_and_refuses_new_ones(fleet):
    router = fleet["router_drain"]
    prompts = [[256, *f"drain {i}".encode()] for i in range(3)]

    async def main():
        async with channel(router.ready["grpc"]) as ch:
            stub = stub_of(ch)
            calls, firsts = await _first_chunks(stub, prompts, 20, "drain")
            os.kill(router.pid, signal.SIGTERM)
            await _until_not_serving(ch)
            refused = await outcome_of(stub, generate_request([256, *b"too late"], 4))
            finished = await asyncio.gather(*(_rest(c) for c in calls))
            return firsts, finished, refused, [await c.code() for c in calls]

    firsts, finished, refused, codes = run(main())
    assert router.proc.wait(20) == 0  # the requests took ~2 s of the 20 s allowed
    assert refused[0] == "UNAVAILABLE" and "shutting down" in refused[1], refused
    assert codes == [grpc.StatusCode.OK] * 3
    for prompt, first, (tokens, finish) in zip(prompts, firsts, finished, strict=True):
        assert finish == "length" and first + tokens == reference(prompt, 20)
    for worker in (fleet["prefill"], fleet["decode"]):
        run(wait_worker_free(worker))


def test_router_sigterm_with_a_short_drain_ends_long_requests_unavailable(fleet):
    router = fleet["router_cut"]

    async def main():
        async with channel(router.ready["grpc"]) as ch:
            calls, _ = await _first_chunks(stub_of(ch), [[256, *b"long one"], [256, *b"long two"]], 300, "cut")
            sent_at = time.monotonic()
            os.kill(router.pid, signal.SIGTERM)
            errors = []
            for call in calls:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await _rest(call)
                errors.append(err.value)
            return errors, time.monotonic() - sent_at

    errors, took_s = run(main())
    assert router.proc.wait(10) == 0
    assert took_s < 8, took_s  # 1 s of drain, then aborted: no hang
    assert all(e.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in e.details() for e in errors), errors
    for worker in (fleet["prefill"], fleet["decode"]):  # released by the router on its way out
        run(wait_worker_free(worker, timeout=10))


def test_decode_worker_sigterm_finishes_its_running_request_then_exits_0(fleet):
    decode, router = fleet["decode_term"], fleet["router_dt"]
    prompt = [256, *b"finish me"]

    async def main():
        async with channel(router.ready["grpc"]) as ch:
            (call,), (first,) = await _first_chunks(stub_of(ch), [prompt], 30, "dt")
            os.kill(decode.pid, signal.SIGTERM)
            return first, await _rest(call), await call.code()

    first, (tokens, finish), code = run(main())
    assert code == grpc.StatusCode.OK and finish == "length" and first + tokens == reference(prompt, 30)
    assert decode.proc.wait(20) == 0
    run(wait_worker_free(fleet["prefill"]))


def _children_of(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_serve_sigterm_stops_everything_and_exits_0():
    served = start("serve", ["serve", "--preset", "tiny",
                             "--port", "0", "--metrics-port", "-1", "--num-slots", "4", "--num-pages", "32",
                             "--max-batch-tokens", "64", "--drain-timeout", "20"], timeout_s=240)
    try:
        children = _children_of(served.pid)
        prompt = [256, *b"served"]

        async def main():
            async with channel(served.ready["grpc"]) as ch:
                stub = stub_of(ch)
                task = asyncio.ensure_future(collect(stub, generate_request(prompt, 24)))
                while (await stub.GetServerInfo(pb.GetServerInfoRequest())).active_requests == 0:
                    await asyncio.sleep(0.05)  # in flight in the router (a loaded machine may take a while)
                os.kill(served.pid, signal.SIGTERM)
                return await task

        _, done = run(main())
        code = served.proc.wait(60)
    finally:
        stop(served)
    assert len(children) == 3, children  # decode, prefill, router
    assert code == 0 and list(done.output_ids) == reference(prompt, 24)
    assert all(_gone(pid) for pid in children), [pid for pid in children if not _gone(pid)]
