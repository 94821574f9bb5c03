"""Helpers for the router tests: start a router, build requests, read streams, wait for free pools."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc

from sparsepd.cluster_token import AuthorizedStub, token_from_env
from sparsepd.deploy.launch import Child, start, stop
from sparsepd.proto import sglang_scheduler_pb2 as pb
from sparsepd.proto import sglang_scheduler_pb2_grpc as pb_grpc

WORKER_ARGS = ["--preset", "tiny", "--num-slots", "16", "--max-batch-tokens", "256", "--num-pages", "192"]


def start_router(prefill: str, decode: str, *extra: str):
    return start("router", ["router", "--port", "0", "--metrics-port", "0", "--prefill", prefill, "--decode", decode,
                            *extra])


def start_at_once(specs: dict[str, list[str]], timeout_s: float = 180.0) -> dict[str, Child]:
    """Start `{name: args}` in parallel (on 2 cores about twice as fast as one after another); if any fails,
    stop those that started and raise its error."""
    started: dict[str, Child] = {}
    errors: list[BaseException] = []

    def one(name: str, args: list[str]) -> None:
        try:
            started[name] = start(name, args, timeout_s=timeout_s)
        except BaseException as exc:  # noqa: BLE001 - raised below, once every thread is done
            errors.append(exc)

    threads = [threading.Thread(target=one, args=item) for item in specs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        for child in started.values():
            stop(child)
        raise errors[0]
    return {name: started[name] for name in specs}


def generate_request(ids: list[int], max_new_tokens: int | None = 8, stream: bool = False, request_id: str = "",
                     **sampling) -> pb.GenerateRequest:
    params = {**dict(temperature=0.0, top_p=1.0, top_k=-1, ignore_eos=True), **sampling}
    sp = pb.SamplingParams(**params)
    if max_new_tokens is not None:
        sp.max_new_tokens = max_new_tokens
    return pb.GenerateRequest(request_id=request_id, tokenized=pb.TokenizedInput(input_ids=ids), sampling_params=sp,
                              stream=stream)


async def collect(stub, request, timeout: float = 60.0) -> tuple[list[pb.GenerateStreamChunk], pb.GenerateComplete]:
    """Every chunk and the one complete of a Generate call (asserts the complete is last and alone)."""
    chunks, completes = [], []
    async for response in stub.Generate(request, timeout=timeout):
        assert not completes, "a response came after the complete"
        assert response.WhichOneof("response") in ("chunk", "complete")
        (chunks if response.HasField("chunk") else completes).append(getattr(response, response.WhichOneof("response")))
    assert len(completes) == 1, completes
    return chunks, completes[0]


async def wait_all_free(stub, timeout: float = 10.0) -> pb.GetLoadsResponse:
    """Poll GetLoads until every live worker's pages and slots are free and nothing is in flight in the router
    (a dead worker's pages went with it; its numbers are its last poll's)."""
    deadline = time.monotonic() + timeout
    while True:
        loads = await stub.GetLoads(pb.GetLoadsRequest(include=["all"]))
        info = await stub.GetServerInfo(pb.GetServerInfoRequest())
        busy = [(x.worker_address, x.num_pages - x.free_pages, x.num_slots - x.free_slots, x.num_running_reqs,
                 x.num_waiting_reqs) for x in loads.loads
                if x.alive and (x.free_pages, x.free_slots, x.num_running_reqs, x.num_waiting_reqs)
                != (x.num_pages, x.num_slots, 0, 0)]
        in_flight = info.scheduler_info["in_flight"]
        if not busy and in_flight == 0:
            return loads
        assert time.monotonic() < deadline, f"still held after {timeout} s: {busy}, router in flight {in_flight}"
        await asyncio.sleep(0.1)


def run(coro):
    return asyncio.run(coro)


def channel(address: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(address)


def stub_of(ch: grpc.aio.Channel) -> pb_grpc.SglangSchedulerStub:
    """The public API's stub; its calls carry the cluster token, so GetServerInfo and GetLoads show the workers'
    addresses (the API itself needs no token)."""
    return AuthorizedStub(pb_grpc.SglangSchedulerStub(ch), token_from_env())
