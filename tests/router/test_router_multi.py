"""`sparsepd serve --prefill 2 --decode 2`: 40 concurrent streams spread over every worker, greedy tokens
equal the single-process reference, and every pool is full again afterwards."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import grpc
import torch

sys.path.insert(0, str(Path(__file__).parent))
from router_helpers import channel, collect, generate_request, run, stub_of, wait_all_free  # noqa: E402

from sparsepd.cluster_token import AuthorizedStub, token_from_env  # noqa: E402
from sparsepd.deploy.launch import start, stop  # noqa: E402
from sparsepd.engine.generate import generate  # noqa: E402
from sparsepd.engine.sampling import SamplingParams  # noqa: E402
from sparsepd.model.weights import build_model  # noqa: E402
from sparsepd.model_config import get_preset  # noqa: E402
from sparsepd.proto import worker_pb2, worker_pb2_grpc  # noqa: E402


async def _stats(address: str, role: str) -> worker_pb2.StatsResponse:
    async with grpc.aio.insecure_channel(address) as ch:
        stub = (worker_pb2_grpc.DecodeWorkerStub if role == "decode" else worker_pb2_grpc.PrefillWorkerStub)(ch)
        stub = AuthorizedStub(stub, token_from_env())
        return await stub.Stats(worker_pb2.StatsRequest())


def test_two_prefill_and_two_decode_workers_share_the_load():
    model = build_model(get_preset("tiny"), seed=0)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 256, (int(n),), generator=gen).tolist()
               for n in torch.randint(1, 90, (40,), generator=gen)]
    want = [generate(model, p, SamplingParams(max_new_tokens=6, ignore_eos=True)).output_ids for p in prompts]
    served = start("serve", ["serve", "--preset", "tiny",
                             "--port", "0", "--metrics-port", "0", "--prefill", "2", "--decode", "2",
                             "--num-slots", "8", "--num-pages", "96", "--batch-tokens", "64"], timeout_s=240)
    try:
        async def main():
            async with channel(served.ready["grpc"]) as ch:
                stub = stub_of(ch)
                results = await asyncio.gather(*[collect(stub, generate_request(p, 6, stream=True)) for p in prompts])
                await wait_all_free(stub)
            stats = {a: await _stats(a, role) for role in ("prefill", "decode") for a in served.ready[role]}
            return results, stats

        results, stats = run(main())
    finally:
        assert stop(served, timeout_s=30) == 0
    assert [list(done.output_ids) for _, done in results] == want
    assert all(stats[a].transfers_ok > 0 for a in served.ready["prefill"]), stats
    assert all(stats[a].tokens_generated > 0 for a in served.ready["decode"]), stats
