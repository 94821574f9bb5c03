"""Bad input and overload through the public API of a real deployment: malformed protobuf bytes, invalid
UTF-8 in a stop string, messages over the size limit, inputs far beyond the context, prompts at the
context's edge, and a burst of 1,000 tiny requests. Each gets its status; the router and workers keep
serving and every page comes back."""

from __future__ import annotations

import asyncio
import random
import sys
from pathlib import Path

import grpc
import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "router"))
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

GENERATE = "/sglang.grpc.scheduler.SglangScheduler/Generate"
MODEL_INFO = "/sglang.grpc.scheduler.SglangScheduler/GetModelInfo"


@pytest.fixture(scope="module")
def router():
    children = []
    try:
        children.append(start("decode", ["decode-worker", *WORKER_ARGS]))
        children.append(start("prefill", ["prefill-worker", *WORKER_ARGS]))
        children.append(start_router(children[1].ready["grpc"], children[0].ready["grpc"], "--max-queue", "1200",
                                     "--batch-tokens", "256"))
        yield children[2].ready["grpc"]
    finally:
        for child in reversed(children):
            stop(child)


async def _raw_generate(ch, data: bytes):
    call = ch.unary_stream(GENERATE, request_serializer=None, response_deserializer=pb.GenerateResponse.FromString)
    return [r async for r in call(data, timeout=30)]


async def _still_serves(stub) -> None:
    _, done = await collect(stub, generate_request([256, *b"still here"], 3))
    assert done.finish_reason == "length" and len(done.output_ids) == 3


def _with_bad_utf8_stop() -> bytes:
    """A GenerateRequest whose stop string holds the bytes ff fe (not UTF-8), built by patching the wire bytes."""
    good = generate_request([256, 65], 4, stop=["XY"]).SerializeToString()
    assert good.count(b"XY") == 1
    return good.replace(b"XY", b"\xff\xfe")


def test_malformed_bytes_are_invalid_argument(router):
    rng = random.Random(7)
    garbage = [b"\xff" * 16, b"\x0a\xff\xff\xff\xff\x0f", generate_request([1, 2], 4).SerializeToString()[:-3],
               *(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))) for _ in range(40))]

    async def main():
        async with channel(router) as ch:
            codes = []
            for data in garbage:
                try:
                    await _raw_generate(ch, data)
                    codes.append("OK")
                except grpc.aio.AioRpcError as exc:
                    codes.append(exc.code().name)
                    if exc.code() == grpc.StatusCode.INVALID_ARGUMENT and "protobuf" in exc.details():
                        assert "GenerateRequest" in exc.details() or "Generate" in exc.details()
            info = ch.unary_unary(MODEL_INFO, request_serializer=None,
                                  response_deserializer=pb.GetModelInfoResponse.FromString)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await info(b"\xff\xff\xff", timeout=10)
            await _still_serves(stub_of(ch))
            return codes, err.value

    codes, err = run(main())
    assert codes[:3] == ["INVALID_ARGUMENT"] * 3
    # Random bytes sometimes parse (then the request itself is refused for what it says); never a crash.
    assert set(codes) <= {"INVALID_ARGUMENT", "OK"} and codes.count("INVALID_ARGUMENT") >= 30, codes
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "not a valid protobuf message" in err.details()


def test_invalid_utf8_in_a_stop_string_is_invalid_argument(router):
    async def main():
        async with channel(router) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await _raw_generate(ch, _with_bad_utf8_stop())
            await _still_serves(stub_of(ch))
            return err.value

    err = run(main())
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "not a valid protobuf message" in err.details()


def test_huge_messages(router):
    async def main():
        async with channel(router) as ch:
            stub = stub_of(ch)
            with pytest.raises(grpc.aio.AioRpcError) as over:  # past the 64 MiB limit: gRPC refuses it
                await _raw_generate(ch, b"\x0a" + b"\x80" * (65 << 20))
            with pytest.raises(grpc.aio.AioRpcError) as long:  # well-formed, 2 MB of ids: the context refuses it
                await collect(stub, generate_request(list(range(200)) * 1000, 4))
            with pytest.raises(grpc.aio.AioRpcError) as stops:  # 10,000 stop strings of 1 KB each
                await collect(stub, generate_request([256, 65], 4, stop=["x" * 1024] * 10_000))
            await _still_serves(stub)
            return over.value, long.value, stops.value

    over, long, stops = run(main())
    assert over.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, over
    assert long.code() == grpc.StatusCode.INVALID_ARGUMENT and "200000 tokens" in long.details()
    assert stops.code() == grpc.StatusCode.INVALID_ARGUMENT and "at most 64 strings" in stops.details()


def test_prompts_at_the_edge_of_the_context(router):
    async def main():
        async with channel(router) as ch:
            stub = stub_of(ch)
            _, full = await collect(stub, generate_request([65] * 1000, 24))  # 1000 + 24 = the whole context
            _, last = await collect(stub, generate_request([66] * 1023, None))  # room for exactly one token
            with pytest.raises(grpc.aio.AioRpcError) as over:
                await collect(stub, generate_request([67] * 1000, 25))
            await wait_all_free(stub)
            return full, last, over.value

    full, last, over = run(main())
    assert full.finish_reason == "length" and len(full.output_ids) == 24
    assert last.finish_reason == "length" and len(last.output_ids) == 1
    assert over.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_new_tokens=25" in over.details()


def test_a_burst_of_1000_tiny_requests(router):
    async def main():
        async with channel(router) as ch:
            stub = stub_of(ch)
            outcomes = await asyncio.gather(*[collect(stub, generate_request([256, i % 256], 2), timeout=240)
                                              for i in range(1000)], return_exceptions=True)
            await wait_all_free(stub, timeout=30)
            return outcomes

    outcomes = run(main())
    failures = [o for o in outcomes if isinstance(o, BaseException)]
    assert not failures, failures[:3]
    assert all(done.finish_reason == "length" and len(done.output_ids) == 2 for _, done in outcomes)
