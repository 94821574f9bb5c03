"""Security through real processes on 127.0.0.1: no request can fail another (a fuzz of sampling parameters
batched with ordinary requests)."""

from __future__ import annotations

import asyncio
import math
import random
import sys
from pathlib import Path

import grpc
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from router_helpers import WORKER_ARGS, channel, generate_request, run, start_router, stub_of, wait_all_free  # noqa: E402

from sparsepd.engine.engine import Engine  # noqa: E402
from sparsepd.engine.pools import PoolConfig  # noqa: E402
from sparsepd.engine.sampling import SamplingParams  # noqa: E402
from sparsepd.launch import start, stop  # noqa: E402
from sparsepd.model.config import get_preset  # noqa: E402
from sparsepd.model.weights import build_model  # noqa: E402
from sparsepd.proto import sglang_scheduler_pb2 as pb  # noqa: E402

MAX_NEW = 4
VOCAB = get_preset("tiny").vocab_size
SUBNORMAL = 1e-45  # the smallest fp32 subnormal (the public proto's floats are fp32)
FP32_MAX = float(torch.finfo(torch.float32).max)
# Per field: (values the API accepts, extremes included; values it refuses). The public proto's floats are fp32.
FIELDS = {
    "temperature": ([0.0, -0.0, SUBNORMAL, 1e-38, 1e-30, 1e-7, 0.7, 1e30, FP32_MAX], [math.nan, math.inf, -math.inf]),
    "top_k": ([-1, 0, 1, 5, 2**31 - 1], [-2]),
    "top_p": ([SUBNORMAL, 1e-30, 0.5, 1.0], [math.nan, math.inf, -1.0, 0.0, 1.5]),
    "min_p": ([0.0, SUBNORMAL, 0.5, 0.999], [math.nan, math.inf, 1.0]),
    "min_new_tokens": ([0, 3, MAX_NEW], [MAX_NEW + 1]),
    "ignore_eos": ([False, True], []),
    "seed": ([0, 7, 2**63 - 1], [2**63, 2**64 - 1]),
}


@pytest.fixture(scope="module")
def deployment():
    children = []
    try:
        children.append(start("decode", ["decode-worker", *WORKER_ARGS]))
        children.append(start("prefill", ["prefill-worker", *WORKER_ARGS]))
        children.append(start_router(children[1].ready["grpc"], children[0].ready["grpc"], "--batch-tokens", "512"))
        yield {"router": children[2].ready["grpc"], "children": children}
    finally:
        for child in reversed(children):
            stop(child)


def _fuzz_params(rng: random.Random) -> tuple[dict, str | None]:
    """Every field at a random accepted extreme; one field in three requests at a refused value instead (its
    name is returned)."""
    params = {name: rng.choice(ok) for name, (ok, _) in FIELDS.items()}
    bad = None
    if rng.random() < 0.33:
        bad = rng.choice([n for n, (_, refused) in FIELDS.items() if refused])
        params[bad] = rng.choice(FIELDS[bad][1])
    return params, bad


async def _outcome(stub, request) -> tuple[str, list[int], str]:
    try:
        done = None
        async for response in stub.Generate(request, timeout=120):
            if response.HasField("complete"):
                done = response.complete
        return done.finish_reason, list(done.output_ids), ""
    except grpc.aio.AioRpcError as exc:
        return exc.code().name, [], exc.details()


def test_sampling_fuzz_never_fails_an_ordinary_request(deployment):
    rng = random.Random(2026)
    gen = torch.Generator().manual_seed(23)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (1, 5, 16, 17, 33, 9)]
    model = build_model(get_preset("tiny"), seed=0)
    engine = Engine(model, PoolConfig(num_slots=8, max_batch_tokens=256, num_pages=64))  # batch invariant
    want = [r.output_ids for r in engine.generate(prompts, SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True))]
    fuzz = [_fuzz_params(rng) for _ in range(24)]
    plain = dict(top_k=-1, top_p=1.0, min_p=0.0, min_new_tokens=0, ignore_eos=True, seed=1)
    fuzz[:4] = [({**plain, "temperature": math.inf, "min_new_tokens": MAX_NEW, "ignore_eos": False}, "temperature"),
                ({**plain, "temperature": math.inf, "top_k": 5}, "temperature"),  # the reported cases
                ({**plain, "temperature": 1e-30}, None), ({**plain, "temperature": 1e30, "min_p": 0.5}, None)]

    async def main():
        async with channel(deployment["router"]) as ch:
            stub = stub_of(ch)
            requests = []
            for i in range(max(len(prompts), len(fuzz))):  # interleaved: every batch mixes both kinds
                if i < len(prompts):
                    requests.append(generate_request(prompts[i], MAX_NEW, request_id=f"ordinary-{i}"))
                if i < len(fuzz):
                    ids = pb.TokenizedInput(input_ids=prompts[i % len(prompts)])
                    sp = pb.SamplingParams(max_new_tokens=MAX_NEW, **fuzz[i][0])
                    requests.append(pb.GenerateRequest(request_id=f"fuzz-{i}", sampling_params=sp, tokenized=ids))
            outcomes = await asyncio.gather(*(_outcome(stub, r) for r in requests))
            await wait_all_free(stub)
            return {r.request_id: o for r, o in zip(requests, outcomes, strict=True)}

    got = run(main())
    assert [got[f"ordinary-{i}"] for i in range(len(prompts))] == [("length", w, "") for w in want]
    for i, (params, bad) in enumerate(fuzz):
        status, ids, details = got[f"fuzz-{i}"]
        if bad is None:
            assert status in ("stop", "length") and 1 <= len(ids) <= MAX_NEW and all(0 <= t < VOCAB for t in ids), \
                (i, params, status, ids, details)
        else:  # refused, naming the field
            assert status == "INVALID_ARGUMENT" and bad in details, (i, params, status, details)
    assert sum(bad is None for _, bad in fuzz) >= 12  # the fuzz reaches the workers, not only the validation
    assert [got[f"fuzz-{i}"][0] for i in (2, 3)] == ["length"] * 2
