"""Other ways to put the router in front of workers: colocated workers (prefill and decode in one engine,
the baseline of the load tests; prompt log-probabilities come on its token stream) and workers that register
themselves with `--router` (multi-host), including a killed decode worker replaced by a new one that registers,
and a worker of another model refused."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import grpc
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from logprob_helpers import IDS, TOP, check_input, check_output, check_streamed, logprob_request  # noqa: E402
from logprob_helpers import reference as logprob_reference  # noqa: E402
from router_helpers import WORKER_ARGS, channel, collect, generate_request, run, stub_of, wait_all_free  # noqa: E402

from sparsepd.deploy.launch import start, stop  # noqa: E402
from sparsepd.engine.generate import generate  # noqa: E402
from sparsepd.engine.sampling import SamplingParams  # noqa: E402
from sparsepd.model.weights import build_model  # noqa: E402
from sparsepd.model_config import get_preset  # noqa: E402
from sparsepd.proto import sglang_scheduler_pb2 as pb  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return build_model(get_preset("tiny"), seed=0)


def _prompts(n: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (int(k),), generator=gen).tolist() for k in torch.randint(1, 90, (n,), generator=gen)]


def test_colocated_workers_serve_the_same_tokens(model):
    """Plain requests; the longest prompt (over the 48-token chunk budget) also asks for its prompt's
    log-probabilities from the first token, top 2 and two chosen ids (they travel with the first token on the
    colocated worker's stream); and one request with a grammar (its first token and the rest drawn in the one
    engine)."""
    from sparsepd.grammar import Grammar

    prompts = _prompts(16, seed=11)
    scored = max(range(len(prompts)), key=lambda i: len(prompts[i]))
    assert len(prompts[scored]) > 48
    ref = logprob_reference(model, prompts[scored], 7)  # greedy: the same tokens as without log-probabilities
    want = [ref.output_ids if i == scored else generate(model, p, SamplingParams(max_new_tokens=7, ignore_eos=True)
                                                         ).output_ids for i, p in enumerate(prompts)]
    ebnf = 'root ::= "yes" | "no" | "maybe " [0-9]'
    want_grammar = generate(model, prompts[0], SamplingParams(max_new_tokens=9, ignore_eos=True,
                                                              grammar=Grammar(kind="ebnf", text=ebnf))).output_ids
    served = start("serve", ["serve", "--preset", "tiny",
                             "--colocated", "--port", "0", "--metrics-port", "-1", "--num-slots", "6",
                             "--num-pages", "64", "--max-batch-tokens", "48", "--batch-tokens", "96"], timeout_s=240)
    try:
        assert "colocated" in served.ready and not served.ready["prefill"]

        async def main():
            async with channel(served.ready["grpc"]) as ch:
                stub = stub_of(ch)
                results = await asyncio.gather(*[collect(stub, logprob_request(p, 7, 0, TOP, IDS, stream=True)
                                                         if i == scored else generate_request(p, 7, stream=i % 2 == 0))
                                                 for i, p in enumerate(prompts)],
                                               collect(stub, generate_request(prompts[0], 9, ebnf_grammar=ebnf)))
                loads = await wait_all_free(stub)
                return results, loads

        results, loads = run(main())
    finally:
        assert stop(served, timeout_s=30) == 0
    (_, grammar_done), results = results[-1], results[:-1]
    assert list(grammar_done.output_ids) == want_grammar and grammar_done.finish_reason == "stop"
    assert [list(done.output_ids) for _, done in results] == want
    chunks, done = results[scored]
    check_input(done.input_logprobs, prompts[scored], 0, TOP, IDS, ref)
    check_output(done.output_logprobs, TOP, IDS, ref)
    check_streamed(chunks, done)
    assert all(done.ttft_ms > 0 and done.transfer_bytes == 0 for _, done in results)
    assert {x.disaggregation.mode for x in loads.loads} == {"prefill", "decode"}  # one process, both handles


async def _healthy(stub) -> bool:
    return (await stub.HealthCheck(pb.HealthCheckRequest())).healthy


async def _wait_healthy(stub, want: bool = True, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while await _healthy(stub) != want:
        assert time.monotonic() < deadline, "the router's health did not change"
        await asyncio.sleep(0.2)


def test_workers_register_and_a_restarted_decode_worker_comes_back(model):
    prompt = [256, *b"registered"]
    want = generate(model, prompt, SamplingParams(max_new_tokens=6, ignore_eos=True)).output_ids
    children = []
    try:
        router = start("router", ["router", "--port", "0", "--metrics-port", "-1", "--heartbeat", "0.5"])
        children.append(router)
        address = router.ready["grpc"]
        join = ["--router", address]

        async def before():
            async with channel(address) as ch:
                stub = stub_of(ch)
                assert not await _healthy(stub)
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await collect(stub, generate_request(prompt, 6))
                return err.value

        err = run(before())
        assert err.code() == grpc.StatusCode.UNAVAILABLE and "no prefill worker is alive" in err.details()
        decode = start("decode", ["decode-worker", *WORKER_ARGS, *join])
        children.append(decode)
        children.append(start("prefill", ["prefill-worker", *WORKER_ARGS, *join]))
        stranger = start("stranger", ["prefill-worker", *WORKER_ARGS, "--seed", "7", *join])
        children.append(stranger)

        async def serve_one():
            async with channel(address) as ch:
                stub = stub_of(ch)
                await _wait_healthy(stub)
                _, done = await collect(stub, generate_request(prompt, 6))
                info = await stub.GetServerInfo(pb.GetServerInfoRequest())
                return list(done.output_ids), [w["address"] for w in info.scheduler_info["workers"]]

        tokens, workers = run(serve_one())
        assert tokens == want
        assert stranger.ready["grpc"] not in workers and len(workers) == 2  # another model's worker is refused
        deadline = time.monotonic() + 10
        while not any("refused" in line and "fingerprint" in line for line in stranger.log_tail):
            assert time.monotonic() < deadline, list(stranger.log_tail)
            time.sleep(0.1)

        os.kill(decode.pid, signal.SIGKILL)  # dies without a word; the router notices by itself

        async def degraded():
            async with channel(address) as ch:
                await _wait_healthy(stub_of(ch), want=False)

        run(degraded())
        children.append(start("decode-2", ["decode-worker", *WORKER_ARGS, *join]))

        async def recovered():
            async with channel(address) as ch:
                stub = stub_of(ch)
                await _wait_healthy(stub)
                _, done = await collect(stub, generate_request(prompt, 6))
                await wait_all_free(stub, timeout=20)  # the dead worker's handle is skipped, the rest are free
                return list(done.output_ids)

        assert run(recovered()) == want
    finally:
        for child in reversed(children):
            stop(child)
