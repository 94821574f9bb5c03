"""Prefill and decode as real processes: greedy tokens equal the single-process engine; pools return to full."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import grpc
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from driver import run_requests, stats  # noqa: E402

from sparsepd.cluster_token import AuthorizedStub, token_from_env  # noqa: E402
from sparsepd.engine.generate import generate  # noqa: E402
from sparsepd.engine.sampling import SamplingParams  # noqa: E402
from sparsepd.engine.state_io import shipped_bytes  # noqa: E402
from sparsepd.model.weights import build_model  # noqa: E402
from sparsepd.model_config import get_preset  # noqa: E402
from sparsepd.proto import worker_pb2, worker_pb2_grpc  # noqa: E402

LENGTHS = [1, 3, 4, 5, 15, 16, 17, 31, 33, 47, 64, 65, 80, 97, 100, 120]
SAMPLING = dict(max_new_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def reference():
    model = build_model(get_preset("tiny"), seed=0)
    gen = torch.Generator().manual_seed(11)
    prompts = {f"r{i}": torch.randint(0, 256, (n,), generator=gen).tolist() for i, n in enumerate(LENGTHS)}
    want = {rid: generate(model, ids, SamplingParams(**SAMPLING)).output_ids for rid, ids in prompts.items()}
    return prompts, want


async def _all_free(workers) -> None:
    for name, role in (("decode", "decode"), ("decode_ipc", "decode"), ("prefill", "prefill")):
        deadline = time.monotonic() + 5
        while True:
            s = await stats(workers[name].ready["grpc"], role)
            if (s.free_pages, s.free_slots) == (s.num_pages, s.num_slots):
                break
            assert time.monotonic() < deadline, f"{name} holds {s.num_pages - s.free_pages} pages"
            await asyncio.sleep(0.1)


@pytest.mark.parametrize("decode", ["decode", "decode_ipc"])
def test_concurrent_requests_match_the_single_process_engine(workers, reference, decode):
    prompts, want = reference
    got = asyncio.run(run_requests(workers["prefill"].ready["grpc"], workers[decode].ready["grpc"], prompts, SAMPLING))
    assert {rid: o["tokens"] for rid, o in got.items()} == want
    assert all(o["finish"] == "length" and not o["error"] for o in got.values())
    cfg = get_preset("tiny")
    for rid, o in got.items():  # bytes shipped per request follow the README's formula
        assert o["transfer_bytes"] == shipped_bytes(cfg, len(prompts[rid])), rid
    asyncio.run(_all_free(workers))


@pytest.mark.parametrize("sampled", [False, True])
def test_a_moved_request_resumes_after_its_tokens(workers, sampled):
    """PrefillRequest.output_ids (what the router sends for a request moved after its worker was lost): the
    prefill worker prefills prompt + those tokens and the decode worker goes on; the new tokens are those the
    undisturbed run drew there (greedy, or seeded with penalties: the random stream and the penalty history
    continue at that position)."""
    model = build_model(get_preset("tiny"), seed=0)
    extra = dict(temperature=0.9, seed=5, frequency_penalty=0.6, repetition_penalty=1.2) if sampled else {}
    sampling = dict(max_new_tokens=12, ignore_eos=True, **extra)
    prompts = {f"m{k}": [256, *range(20 + k, 40 + 2 * k)] for k in (1, 4, 11)}
    full = {rid: generate(model, ids, SamplingParams(**sampling)).output_ids for rid, ids in prompts.items()}
    resume = {rid: full[rid][:int(rid[1:])] for rid in prompts}
    got = asyncio.run(run_requests(workers["prefill"].ready["grpc"], workers["decode"].ready["grpc"], prompts,
                                   sampling, resume=resume))
    assert {rid: resume[rid] + o["tokens"] for rid, o in got.items()} == full
    assert all(o["finish"] == "length" and not o["error"] for o in got.values())
    asyncio.run(_all_free(workers))


def test_bad_control_input_is_refused_and_workers_keep_serving(workers, reference):
    prompts, want = reference

    async def go():
        async with grpc.aio.insecure_channel(workers["decode"].ready["grpc"]) as ch:
            d = AuthorizedStub(worker_pb2_grpc.DecodeWorkerStub(ch), token_from_env())
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await d.Reserve(worker_pb2.ReserveRequest(request_id="x", prompt_len=0))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await d.Reserve(worker_pb2.ReserveRequest(request_id="x", prompt_len=5000,
                                                          sampling=worker_pb2.SamplingParams(max_new_tokens=4)))
            assert e.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED)
            assert not (await d.Release(worker_pb2.ReleaseRequest(request_id="never-seen"))).found
        async with grpc.aio.insecure_channel(workers["prefill"].ready["grpc"]) as ch:
            p = AuthorizedStub(worker_pb2_grpc.PrefillWorkerStub(ch), token_from_env())
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await p.Prefill(worker_pb2.PrefillBatch(requests=[worker_pb2.PrefillRequest(request_id="y")]))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            # a ticket nobody issued: the decode worker rejects the state, the prefill worker reports it
            bogus = worker_pb2.Ticket(transfer_id="nope", endpoint=workers["decode"].ready["zmq"],
                                      fingerprint=workers["decode"].ready["fingerprint"])
            r = await p.Prefill(worker_pb2.PrefillBatch(requests=[worker_pb2.PrefillRequest(
                request_id="z", input_ids=[1, 2, 3, 4, 5], sampling=worker_pb2.SamplingParams(max_new_tokens=4),
                ticket=bogus)]))
            assert not r.results[0].ok and r.results[0].error
        one = {"r5": prompts["r5"]}
        got = await run_requests(workers["prefill"].ready["grpc"], workers["decode"].ready["grpc"], one, SAMPLING)
        assert got["r5"]["tokens"] == want["r5"]
        await _all_free(workers)

    asyncio.run(go())


def test_reservation_without_state_expires_and_frees_pages(workers):
    async def go():
        async with grpc.aio.insecure_channel(workers["decode"].ready["grpc"]) as ch:
            d = AuthorizedStub(worker_pb2_grpc.DecodeWorkerStub(ch), token_from_env())
            await d.Reserve(worker_pb2.ReserveRequest(request_id="lonely", prompt_len=40, ttl_s=0.5,
                                                      sampling=worker_pb2.SamplingParams(max_new_tokens=4)))
            s = await d.Stats(worker_pb2.StatsRequest())
            assert s.free_pages < s.num_pages
        await asyncio.sleep(1.0)
        await _all_free(workers)

    asyncio.run(go())


def test_dead_decode_worker_fails_the_request_and_frees_prefill_pages(workers):
    from sparsepd.deploy.launch import start, stop

    doomed = start("doomed-decode", ["decode-worker", "--preset", "tiny", "--num-pages", "64"])

    async def go():
        async with grpc.aio.insecure_channel(doomed.ready["grpc"]) as ch:
            decode = AuthorizedStub(worker_pb2_grpc.DecodeWorkerStub(ch), token_from_env())
            ticket = (await decode.Reserve(worker_pb2.ReserveRequest(
                request_id="orphan", prompt_len=30, sampling=worker_pb2.SamplingParams(max_new_tokens=5)))).ticket
        stop(doomed)  # the decode side is gone before the state is pushed
        async with grpc.aio.insecure_channel(workers["prefill"].ready["grpc"]) as ch:
            prefill = AuthorizedStub(worker_pb2_grpc.PrefillWorkerStub(ch), token_from_env())
            r = await prefill.Prefill(worker_pb2.PrefillBatch(requests=[
                worker_pb2.PrefillRequest(request_id="orphan", input_ids=list(range(30)), ticket=ticket,
                                          sampling=worker_pb2.SamplingParams(max_new_tokens=5))]))
        assert not r.results[0].ok and "transfer" in r.results[0].error, r.results[0].error
        s = await stats(workers["prefill"].ready["grpc"], "prefill")
        assert (s.free_pages, s.free_slots) == (s.num_pages, s.num_slots) and s.transfers_failed >= 1

    try:
        asyncio.run(go())
    finally:
        stop(doomed)
