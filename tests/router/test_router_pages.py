"""Pages on demand through the service: a decode worker whose pool cannot hold every running request's growth
retracts some (state to host memory) and resumes them, and every request streams the single-process
reference's tokens (with no host memory for retracted states, the newest fails RESOURCE_EXHAUSTED instead); a
streamed request without max_new_tokens holds only the pages its tokens fill, not its context's; every pool is
full again afterwards."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import grpc
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from router_helpers import channel, collect, generate_request, run, start_router, stub_of, wait_all_free  # noqa: E402

from sparsepd.cluster_token import AuthorizedStub, token_from_env  # noqa: E402
from sparsepd.deploy.launch import start, stop  # noqa: E402
from sparsepd.engine.generate import generate  # noqa: E402
from sparsepd.engine.sampling import SamplingParams  # noqa: E402
from sparsepd.model.weights import build_model  # noqa: E402
from sparsepd.model_config import get_preset  # noqa: E402
from sparsepd.proto import sglang_scheduler_pb2 as pb  # noqa: E402
from sparsepd.proto import worker_pb2, worker_pb2_grpc  # noqa: E402

CFG = get_preset("tiny")
ARGS = ["--preset", "tiny", "--num-slots", "8", "--max-batch-tokens", "256"]


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


async def _decode_stats(address: str) -> worker_pb2.StatsResponse:
    async with grpc.aio.insecure_channel(address) as ch:
        return await AuthorizedStub(worker_pb2_grpc.DecodeWorkerStub(ch), token_from_env()).Stats(
            worker_pb2.StatsRequest())


PROMPTS = [_ids(n, seed=n) for n in (12, 20, 7, 25, 16, 9)]


@pytest.fixture(scope="module")
def references() -> list[list[int]]:
    model = build_model(CFG, seed=0)
    return [generate(model, p, SamplingParams(max_new_tokens=60, ignore_eos=True)).output_ids for p in PROMPTS]


def _run_small_pool(*decode_args: str) -> tuple[list, worker_pb2.StatsResponse]:
    """The six prompts at once through a router and a decode worker of 16 pages (256 tokens for ~470): each
    request's (chunks, complete) or its error, and the decode worker's Stats once every pool is free again."""
    children = []
    try:
        children.append(start("decode", ["decode-worker", *ARGS, "--num-pages", "16", *decode_args]))
        children.append(start("prefill", ["prefill-worker", *ARGS, "--num-pages", "64"]))
        children.append(start_router(children[1].ready["grpc"], children[0].ready["grpc"]))

        async def main():
            async with channel(children[2].ready["grpc"]) as ch:
                stub = stub_of(ch)
                results = await asyncio.gather(*(collect(stub, generate_request(p, 60, stream=True), timeout=240)
                                                 for p in PROMPTS), return_exceptions=True)
                await wait_all_free(stub, timeout=30)
            return results, await _decode_stats(children[0].ready["grpc"])

        return run(main())
    finally:
        for child in reversed(children):
            stop(child)


def test_a_small_decode_pool_retracts_and_every_request_gets_its_tokens(references):
    results, stats = _run_small_pool()
    assert [list(done.output_ids) for _, done in results] == references
    assert all(done.finish_reason == "length" for _, done in results)
    assert stats.retractions > 0, stats


def test_with_no_host_memory_for_retracted_requests_the_newest_fails_resource_exhausted(references):
    """--max-retracted-memory 0: where the pool above retracts, the newest decoding request fails
    RESOURCE_EXHAUSTED naming the bound instead; the others stream the reference's tokens."""
    results, stats = _run_small_pool("--max-retracted-memory", "0")
    assert all(isinstance(r, tuple | grpc.aio.AioRpcError) for r in results), results
    failed = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert failed and all(e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-retracted-memory" in e.details()
                          for e in failed), failed
    done = [(r[1], want) for r, want in zip(results, references, strict=True) if not isinstance(r, BaseException)]
    assert done and all(list(d.output_ids) == want and d.finish_reason == "length" for d, want in done)
    assert stats.retractions == 0, stats


def test_a_request_without_a_limit_holds_only_the_pages_it_fills():
    children = []
    try:
        children.append(start("decode", ["decode-worker", *ARGS, "--num-pages", "512"]))
        children.append(start("prefill", ["prefill-worker", *ARGS, "--num-pages", "512"]))
        children.append(start_router(children[1].ready["grpc"], children[0].ready["grpc"]))

        async def main():
            async with channel(children[2].ready["grpc"]) as ch:
                stub = stub_of(ch)
                request = generate_request(_ids(20, seed=1), None, stream=True)  # up to the context: 1,004 tokens
                call = stub.Generate(request, timeout=120)
                seen = 0
                async for response in call:
                    seen += len(response.chunk.token_ids)
                    if seen >= 30:
                        break
                loads = await stub.GetLoads(pb.GetLoadsRequest(include=["all"]))
                call.cancel()
                await wait_all_free(stub, timeout=30)
            return [x for x in loads.loads if x.disaggregation.mode == "decode"][0]

        decode = run(main())
    finally:
        for child in reversed(children):
            stop(child)
    used = decode.num_pages - decode.free_pages
    assert 1 <= used <= 5, used  # 20 + ~30 tokens fill 4 pages of 16; the whole context would take 64
