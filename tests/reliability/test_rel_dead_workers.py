"""Workers that die with work in flight, through the public API (real processes on 127.0.0.1):

- a decode worker killed mid-stream: its request is moved to the other decode worker (re-prefilled with the
  tokens it already streamed) and finishes there: the client's stream goes on without a repeated or lost
  token and the whole output equals the reference; the request already on the survivor finishes too, new
  requests go to the survivor, the router stays up, the move is counted, and the prefill worker and the
  surviving decode worker are back to full pools;
- a seeded n = 2 request with its choices on two decode workers, one killed: that choice is moved alone and
  both choices end with the tokens of their independent runs;
- a prefill worker that crashes with a batch in flight (SPARSEPD_FAULTS prefill.step=crash, then another at
  prefill.push=crash): every request of the batch is moved to the healthy prefill worker and finishes with
  the reference tokens, once each; the decode worker's reservations of the lost batch are released; a later
  request is served by the healthy prefill worker with the reference tokens.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import grpc
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from rel_helpers import (  # noqa: E402
    Fleet,
    channel,
    generate_request,
    outcome_of,
    reference,
    router_counts,
    router_outcomes,
    run,
    sampled_reference,
    stub_of,
    wait_all_free,
    wait_worker_free,
    worker_stats,
)

from sparsepd.faults import CRASH_EXIT_CODE  # noqa: E402
from sparsepd.router.params import choice_seed  # noqa: E402


@pytest.fixture(scope="module")
def fleet():
    fleet = Fleet()
    try:
        fleet.workers(prefill=("prefill", None, []), decode_a=("decode", None, []), decode_b=("decode", None, []),
                      crash_step=("prefill", {"SPARSEPD_FAULTS": "prefill.step=crash"}, []),
                      crash_push=("prefill", {"SPARSEPD_FAULTS": "prefill.push=crash"}, []))
        yield fleet
    finally:
        fleet.stop_all()


def test_killed_decode_worker_mid_stream(fleet):
    prefill, decodes = fleet["prefill"], [fleet["decode_a"], fleet["decode_b"]]
    router = fleet.routers(router_dd=([prefill], decodes, []))["router_dd"]
    long_prompt, short_prompt, later_prompt = [256, *b"doomed"], [256, *b"survivor"], [256, *b"later"]

    async def main():
        async with channel(router.ready["grpc"]) as ch:
            stub = stub_of(ch)
            moved = stub.Generate(generate_request(long_prompt, 60, stream=True, request_id="dd-moved"), timeout=120)
            streamed = list((await moved.read()).chunk.token_ids)
            survivor = asyncio.ensure_future(outcome_of(stub, generate_request(short_prompt, 40, stream=True,
                                                                               request_id="dd-survivor")))
            running = {}
            while sorted(running.values()) != [1, 1]:  # one request on each decode worker (placement spreads)
                await asyncio.sleep(0.05)
                running = {d.name: (await worker_stats(d)).running for d in decodes}
            stats = {d.name: await worker_stats(d) for d in decodes}
            victim = max(decodes, key=lambda d: stats[d.name].num_pages - stats[d.name].free_pages)  # the long one
            os.kill(victim.pid, signal.SIGKILL)
            done = None
            while (response := await moved.read()) != grpc.aio.EOF:
                if response.HasField("chunk"):
                    streamed += response.chunk.token_ids
                else:
                    done = response.complete
            survived = await survivor
            later = await outcome_of(stub, generate_request(later_prompt, 8, request_id="dd-later"))
            loads = await wait_all_free(stub, timeout=20)
            return victim, streamed, done, survived, later, loads

    victim, streamed, done, survived, later, loads = run(main())
    assert router.alive()
    want = reference(long_prompt, 60)
    assert streamed == list(done.output_ids) == want  # no token repeated or lost across the move
    assert (done.finish_reason, done.prompt_tokens, done.completion_tokens) == ("length", len(long_prompt), 60)
    assert survived == ("length", "", reference(short_prompt, 40))
    assert later == ("length", "", reference(later_prompt, 8))
    alive = {x.worker_address: x.alive for x in loads.loads}
    survivor = next(d for d in decodes if d is not victim)
    assert alive == {prefill.ready["grpc"]: True, victim.ready["grpc"]: False, survivor.ready["grpc"]: True}
    assert router_outcomes(router) == {"length": 3}
    assert router_counts(router, "migrations", "cause") == {"decode": 1}
    run(wait_worker_free(prefill))
    run(wait_worker_free(survivor))


def test_each_choice_of_n_moves_on_its_own(fleet):
    """n = 2, seeded: the choices run on both decode workers; one is killed: its choice is moved alone (resumed
    from its own tokens with its own seed) and both end with the tokens of their independent runs."""
    survivor = next(c for c in fleet.children if c.name.startswith("decode_") and c.alive())
    fresh = fleet.workers(decode_c=("decode", None, []))["decode_c"]
    decodes = [survivor, fresh]
    router = fleet.routers(router_n=([fleet["prefill"]], decodes, []))["router_n"]
    prompt, seed, n_tokens = [256, *b"two choices"], 4242, 40

    async def main():
        async with channel(router.ready["grpc"]) as ch:
            stub = stub_of(ch)
            request = generate_request(prompt, n_tokens, stream=True, request_id="dd-n", temperature=0.8, seed=seed)
            request.sampling_params.n = 2
            call = stub.Generate(request, timeout=120)
            streamed, completes = {0: [], 1: []}, {}
            first = await call.read()
            streamed[first.chunk.index] += first.chunk.token_ids
            while sorted([(await worker_stats(d)).running for d in decodes]) != [1, 1]:
                await asyncio.sleep(0.05)
            os.kill(decodes[0].pid, signal.SIGKILL)
            while (response := await call.read()) != grpc.aio.EOF:
                if response.HasField("chunk"):
                    streamed[response.chunk.index] += response.chunk.token_ids
                else:
                    completes[response.complete.index] = response.complete
            await wait_all_free(stub, timeout=20)
            return streamed, completes

    streamed, completes = run(main())
    for i in (0, 1):
        want = sampled_reference(prompt, n_tokens, seed if i == 0 else choice_seed(seed, i), temperature=0.8)
        assert streamed[i] == list(completes[i].output_ids) == want, i
        assert completes[i].finish_reason == "length"
    assert router_counts(router, "migrations", "cause") == {"decode": 1}
    run(wait_worker_free(fresh))


@pytest.mark.parametrize("point", ["step", "push"])
def test_prefill_worker_crashing_with_a_batch_in_flight(fleet, point):
    crashing, healthy = fleet[f"crash_{point}"], fleet["prefill"]
    decode = next(c for c in fleet.children if c.name.startswith("decode_") and c.alive())
    # The crashing worker is listed first: with nothing queued the router picks it. A long batch wait, also at
    # an idle worker, puts the three requests in one batch.
    name = f"router_{point}"
    wait = ["--batch-wait-ms", "300", "--batch-wait-idle"]
    router = fleet.routers(**{name: ([crashing, healthy], [decode], wait)})[name]
    prompts = [[256, *f"crash {point} {i}".encode()] for i in range(3)]
    later_prompt = [256, *b"after the crash"]

    async def main():
        async with channel(router.ready["grpc"]) as ch:
            stub = stub_of(ch)
            outcomes = await asyncio.gather(*(outcome_of(stub, generate_request(p, 8, request_id=f"{point}-{i}"))
                                              for i, p in enumerate(prompts)))
            freed = await wait_worker_free(decode)  # the reservations of the lost batch
            later = await outcome_of(stub, generate_request(later_prompt, 8, request_id=f"{point}-later"))
            await wait_all_free(stub, timeout=20)
            return outcomes, freed, later

    healthy_before = run(worker_stats(healthy)).transfers_ok
    outcomes, freed, later = run(main())
    assert crashing.proc.wait(10) == CRASH_EXIT_CODE
    assert outcomes == [("length", "", reference(p, 8)) for p in prompts]  # moved to the healthy worker
    assert freed.free_pages == freed.num_pages and freed.free_slots == freed.num_slots
    assert later == ("length", "", reference(later_prompt, 8))
    assert run(worker_stats(healthy)).transfers_ok == healthy_before + 4  # the lost batch, then the later one
    assert router_outcomes(router) == {"length": 4}
    assert router_counts(router, "migrations", "cause") == {"prefill": 3}
