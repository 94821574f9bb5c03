"""`--stream-interval` and `--timing-log` through a real `sparsepd serve --colocated` (router and worker
processes): streams still deliver every token once and in order (the first at once, then chunks of at least
the interval, the rest before the complete) and equal the single-process engine, for 8 concurrent requests, a
stop string, an abort mid-stream and n = 2; every request leaves one timing line that matches what its client
received; a cancelled one is noted CANCELLED; every page and slot is free afterwards."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import grpc
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from router_helpers import channel, collect, generate_request, run, stub_of, wait_all_free  # noqa: E402

from sparsepd.deploy.launch import start, stop  # noqa: E402
from sparsepd.engine.generate import generate_with_engine  # noqa: E402
from sparsepd.engine.sampling import SamplingParams  # noqa: E402
from sparsepd.model.weights import build_model  # noqa: E402
from sparsepd.model_config import get_preset  # noqa: E402
from sparsepd.proto import sglang_scheduler_pb2 as pb  # noqa: E402

INTERVAL = 4
MAX_NEW = 14  # not a multiple of the interval: the last chunk is a remainder


@pytest.fixture(scope="module")
def model():
    return build_model(get_preset("tiny"), seed=0)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    timing = tmp_path_factory.mktemp("timing") / "timing.jsonl"
    child = start("serve", ["serve", "--preset", "tiny", "--colocated", "--port", "0", "--metrics-port", "-1",
                            "--num-slots", "12", "--num-pages", "96", "--max-batch-tokens", "64",
                            "--stream-interval", str(INTERVAL), "--timing-log", str(timing)], timeout_s=240)
    try:
        yield child.ready["grpc"], timing
    finally:
        assert stop(child, timeout_s=30) == 0


def _greedy(model, ids: list[int], max_new: int) -> list[int]:
    return generate_with_engine(model, ids, SamplingParams(max_new_tokens=max_new, ignore_eos=True)).output_ids


def _check_chunks(chunks: list[pb.GenerateStreamChunk], output: list[int]) -> None:
    """Every token once, in order; the first chunk the first token alone; then at least INTERVAL a chunk but the
    last; cumulative counts."""
    assert [t for c in chunks for t in c.token_ids] == output
    assert len(chunks[0].token_ids) == 1
    assert all(len(c.token_ids) >= INTERVAL for c in chunks[1:-1]), [len(c.token_ids) for c in chunks]
    assert [c.completion_tokens for c in chunks] == torch.tensor([len(c.token_ids) for c in chunks]).cumsum(0).tolist()


def _timing_lines(path: Path) -> dict[str, dict]:
    return {r["request_id"]: r for r in (json.loads(x) for x in path.read_text().splitlines())}


def test_concurrent_streams_deliver_every_token_in_order_and_match_the_timing_log(served, model):
    address, timing = served
    gen = torch.Generator().manual_seed(11)
    prompts = {f"iv-{i}": [256, *torch.randint(0, 256, (3 + 7 * i,), generator=gen).tolist()] for i in range(8)}

    async def main():
        async with channel(address) as ch:
            stub = stub_of(ch)
            results = await asyncio.gather(*(collect(stub, generate_request(ids, MAX_NEW, stream=True, request_id=rid))
                                             for rid, ids in prompts.items()))
            await wait_all_free(stub)
            return results

    results = run(main())
    lines = _timing_lines(timing)
    for (rid, ids), (chunks, done) in zip(prompts.items(), results, strict=True):
        want = _greedy(model, ids, MAX_NEW)
        assert list(done.output_ids) == want and done.finish_reason == "length", rid
        _check_chunks(chunks, want)
        line = lines[rid]
        assert line["status"] == "OK" and line["tokens"] == MAX_NEW
        assert line["chunk_tokens"] == [len(c.token_ids) for c in chunks]
        assert line["emit_ms"] == sorted(line["emit_ms"]) and line["end_ms"] >= line["emit_ms"][-1] > 0


def test_a_stop_string_ends_the_stream_with_the_held_tokens_delivered(served, model):
    address, _ = served
    ids = [256, *b"stop strings held"]
    out = _greedy(model, ids, 60)
    start_at = next(i for i in range(6, len(out) - 2) if all(32 <= t < 127 for t in out[i:i + 2])
                    and bytes(out[i:i + 2]) not in bytes(out[:i + 1]))
    stop_str = bytes(out[start_at:start_at + 2]).decode()

    async def main():
        async with channel(address) as ch:
            return await collect(stub_of(ch), generate_request(ids, 60, stream=True, stop=[stop_str]))

    chunks, done = run(main())
    assert done.finish_reason == "stop" and done.matched_stop_str == stop_str
    assert list(done.output_ids) == out[:start_at + 2]
    _check_chunks(chunks, list(done.output_ids))


def test_abort_and_cancel_mid_stream(served):
    address, timing = served

    async def main():
        async with channel(address) as ch:
            stub = stub_of(ch)
            call = stub.Generate(generate_request([256, *b"abort me"], 400, stream=True, request_id="iv-abort"))
            first = await call.read()
            await asyncio.sleep(0.3)  # some tokens held for the next chunk, some sent
            reply = await stub.Abort(pb.AbortRequest(request_id="iv-abort"))
            rest = []
            while (response := await call.read()) != grpc.aio.EOF:
                rest.append(response)
            cancelled = stub.Generate(generate_request([256, *b"cancel me"], 400, stream=True,
                                                       request_id="iv-cancel"))
            await cancelled.read()
            cancelled.cancel()
            await wait_all_free(stub)
            return first, reply, rest

    first, reply, rest = run(main())
    assert reply.success and rest[-1].HasField("complete")
    done = rest[-1].complete
    assert done.finish_reason == "abort" and 1 <= len(done.output_ids) < 400
    streamed = [*first.chunk.token_ids, *(t for r in rest[:-1] for t in r.chunk.token_ids)]
    assert streamed == list(done.output_ids)  # the held tokens went out before the complete
    for _ in range(50):  # the cancelled call's line is written as its handler unwinds
        lines = _timing_lines(timing)
        if "iv-cancel" in lines:
            break
        run(asyncio.sleep(0.1))
    assert lines["iv-abort"]["status"] == "OK" and lines["iv-abort"]["tokens"] == len(done.output_ids)
    assert lines["iv-cancel"]["status"] == "CANCELLED" and lines["iv-cancel"]["end_ms"] is None


def test_n_choices_each_deliver_every_token_in_order(served, model):
    address, _ = served
    ids = [256, *b"two ways"]
    request = generate_request(ids, MAX_NEW, stream=True, request_id="iv-n")
    request.sampling_params.n = 2

    async def main():
        streamed, completes = {}, {}
        async with channel(address) as ch:
            stub = stub_of(ch)
            async for response in stub.Generate(request, timeout=60):
                if response.HasField("chunk"):
                    streamed.setdefault(response.chunk.index, []).append(response.chunk)
                else:
                    completes[response.complete.index] = response.complete
            await wait_all_free(stub)
        return streamed, completes

    streamed, completes = run(main())
    want = _greedy(model, ids, MAX_NEW)  # greedy: both choices are the greedy output
    assert sorted(completes) == [0, 1]
    for index in (0, 1):
        assert list(completes[index].output_ids) == want
        _check_chunks(streamed[index], want)
