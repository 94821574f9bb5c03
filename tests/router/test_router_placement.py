"""Placement (router/placement.py): the router counts its own reservations at once, so a burst spreads over
the decode workers; ties go round robin; a worker that can hold the request comes first. Unit tests on
worker handles without processes, then 12 concurrent streams over two real decode workers."""

from __future__ import annotations

import asyncio
import random
import sys
import time
from collections import Counter
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).parent))
from router_helpers import (  # noqa: E402
    WORKER_ARGS,
    channel,
    collect,
    generate_request,
    run,
    start_at_once,
    stub_of,
    wait_all_free,
)

from sparsepd.cluster_token import AuthorizedStub, token_from_env  # noqa: E402
from sparsepd.deploy.launch import start, stop  # noqa: E402
from sparsepd.proto import worker_pb2, worker_pb2_grpc  # noqa: E402
from sparsepd.router.flow import Flow  # noqa: E402
from sparsepd.router.params import RequestSpec  # noqa: E402
from sparsepd.router.reservations import NoRoom, Reservations  # noqa: E402
from sparsepd.router.workers import WorkerPool  # noqa: E402

PAGE = 16


def _pool(decode: int, prefill: int = 0, pages: int = 192, slots: int = 16) -> WorkerPool:
    pool = WorkerPool([f"127.0.0.1:{1000 + i}" for i in range(prefill)],
                      [f"127.0.0.1:{2000 + i}" for i in range(decode)], page_size=PAGE)
    for w in pool.all:
        w.alive = True
        w.seen(worker_pb2.StatsResponse(num_pages=pages, free_pages=pages, num_slots=slots, free_slots=slots), 0.0)
    return pool


def _burst(pool: WorkerPool, sizes: list[int]) -> Counter[str]:
    """Place every request before any Reserve answers (what a prefill batch's gathered reservations do)."""
    placed: Counter[str] = Counter()
    for tokens in sizes:
        worker = pool.decode_order(tokens)[0]
        worker.hold(pool.placement.pages_for(tokens))
        pool.placement.chose(worker)
        placed[worker.address] += 1
    return placed


def test_a_burst_of_12_over_2_decode_workers_splits_evenly():
    placed = _burst(_pool(2), [30 + 80] * 12)
    assert sorted(placed.values()) == [6, 6], placed


def test_a_burst_of_64_over_4_decode_workers_splits_within_20_12():
    rng = random.Random(0)
    pool = _pool(4, pages=2048, slots=64)
    placed = _burst(pool, [rng.randrange(1, 200) + rng.randrange(1, 120) for _ in range(64)])
    assert len(placed) == 4 and max(placed.values()) <= 20 and min(placed.values()) >= 12, placed


def test_reservations_answered_and_polled_in_between_stay_balanced():
    """Reserves answered and polls in between, one of them asked before the last reserve was confirmed: the
    view neither counts a reservation twice nor forgets one the worker has not reported; the split stays
    within 20/12."""
    rng = random.Random(1)
    pool = _pool(4, pages=2048, slots=64)
    used = {w.address: [0, 0] for w in pool.decode}  # what each worker really holds: pages, slots
    placed: Counter[str] = Counter()

    def poll(asked_at: float) -> None:
        for w in pool.decode:
            pages, slots = used[w.address]
            w.seen(worker_pb2.StatsResponse(num_pages=2048, free_pages=2048 - pages, num_slots=64,
                                            free_slots=64 - slots), asked_at)

    for i in range(64):
        tokens = rng.randrange(20, 300)
        worker = pool.decode_order(tokens)[0]
        need = pool.placement.pages_for(tokens)
        worker.hold(need)
        pool.placement.chose(worker)
        placed[worker.address] += 1
        asked = time.monotonic()  # a Stats asked now does not see this reservation
        worker.unhold(need, granted=need)
        if i % 5 == 4:
            poll(asked)
            assert worker.free_pages == 2048 - used[worker.address][0] - need  # not in the Stats: still counted
        used[worker.address][0] += need
        used[worker.address][1] += 1
    assert max(placed.values()) <= 20 and min(placed.values()) >= 12, placed
    poll(time.monotonic())
    for w in pool.decode:
        pages, slots = used[w.address]
        assert (w.free_pages, w.free_slots, len(w.confirmed)) == (2048 - pages, 64 - slots, 0)


def test_slots_freed_since_the_last_stats_count_and_a_full_worker_is_not_asked_again():
    """A worker whose Stats and our reservations since leave no slot is known full. While a Reserve of ours is on
    its way there, Reservations.reserve sends it no other (it would refuse: a batch's flows reserve at once); with
    none in flight it is asked all the same (a stale view must not fail a request). A request of ours ending there
    frees a slot in the view at once, until a Stats asked after that counts it itself."""
    pool = _pool(1, slots=2)
    (w,) = pool.decode
    w.hold(4)
    w.unhold(4, granted=4)
    w.hold(4)  # the second Reserve is in flight
    assert w.free_slots == 0 and w.known_full()

    class Refusing:
        calls = 0

        async def Reserve(self, request, timeout=None):
            Refusing.calls += 1
            raise grpc.aio.AioRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                       "full")

    w.stub = Refusing()
    flow = Flow(RequestSpec("r", [1] * 20, worker_pb2.SamplingParams(max_new_tokens=8), 8))
    reservations = Reservations(pool, 30.0, lambda coro: None, asyncio.Event())
    result = asyncio.run(reservations.reserve(flow))
    assert isinstance(result, NoRoom) and result.unasked and "no free slot" in result.last and Refusing.calls == 0
    # skipped on our view alone: the flow waits, even with nothing of ours left to come back
    assert reservations.no_room(flow, result.last, reservations.room_freed, [], unasked=True) is None
    w.unhold(4)  # that one was refused: with nothing in flight the worker is asked even though the view says full
    w.hold(4)
    w.unhold(4, granted=4)
    assert w.known_full()
    result = asyncio.run(reservations.reserve(flow))
    assert isinstance(result, NoRoom) and not result.unasked and result.last.endswith("full") and Refusing.calls == 1
    assert reservations.no_room(flow, result.last, reservations.room_freed, []) is not None

    asked = time.monotonic()
    w.slot_freed()  # a request ended there after this Stats was asked: counted until the next one
    w.seen(worker_pb2.StatsResponse(num_pages=192, free_pages=184, num_slots=2, free_slots=0), asked)
    assert w.free_slots == 1 and not w.known_full()
    w.seen(worker_pb2.StatsResponse(num_pages=192, free_pages=188, num_slots=2, free_slots=1), time.monotonic())
    assert (w.free_slots, len(w.freed), len(w.confirmed)) == (1, 0, 0)


def test_the_worker_that_can_hold_the_request_comes_first():
    pool = _pool(2)
    roomy, cramped = pool.decode
    cramped.seen(worker_pb2.StatsResponse(num_pages=192, free_pages=30, num_slots=16, free_slots=16), 0.0)
    roomy.seen(worker_pb2.StatsResponse(num_pages=192, free_pages=100, num_slots=16, free_slots=1), 0.0)
    assert pool.decode_order(40 * PAGE) == [roomy, cramped]  # cramped is less loaded but lacks the 40 pages
    assert pool.decode_order(5 * PAGE) == [cramped, roomy]  # both can: the less loaded one (84% < 94%)
    cramped.hold(20)
    assert pool.decode_order(5 * PAGE) == [roomy, cramped]  # 10 pages left there now: 95%
    roomy.hold(5)
    assert pool.decode_order(5 * PAGE) == [cramped, roomy]  # roomy's last slot is held
    roomy.alive = False
    assert pool.decode_order(5 * PAGE) == [cramped]


def test_idle_prefill_workers_take_batches_in_turn():
    pool = _pool(1, prefill=3)
    order = []
    for _ in range(6):
        prefill = pool.pick_prefill()
        pool.placement.chose(prefill)
        order.append(prefill.index)
    assert order == [0, 1, 2, 0, 1, 2]
    pool.prefill[1].queued_tokens = 50  # the fewest queued tokens wins over the turn
    assert pool.pick_prefill().index in (0, 2)
    pool.prefill[0].queued_tokens = pool.prefill[2].queued_tokens = 80
    assert pool.pick_prefill().index == 1


async def _admitted(address: str) -> int:
    async with grpc.aio.insecure_channel(address) as ch:
        stub = AuthorizedStub(worker_pb2_grpc.DecodeWorkerStub(ch), token_from_env())
        return (await stub.Stats(worker_pb2.StatsRequest(), timeout=5)).transfers_ok


def test_12_concurrent_streams_over_two_decode_workers():
    """The issue's run: 12 concurrent streams of 30 prompt tokens and 60-80 new ones, sent at once."""
    children = []
    try:
        workers = start_at_once({"decode-a": ["decode-worker", *WORKER_ARGS],
                                 "decode-b": ["decode-worker", *WORKER_ARGS],
                                 "prefill": ["prefill-worker", *WORKER_ARGS]})
        children += workers.values()
        decode = [workers["decode-a"].ready["grpc"], workers["decode-b"].ready["grpc"]]
        router = start("router", ["router", "--port", "0", "--metrics-port", "-1", "--prefill",
                                  workers["prefill"].ready["grpc"], "--decode", decode[0], "--decode", decode[1]])
        children.append(router)
        rng = random.Random(21)
        prompts = [[256, *(rng.randrange(256) for _ in range(29))] for _ in range(12)]

        async def main():
            async with channel(router.ready["grpc"]) as ch:
                stub = stub_of(ch)
                results = await asyncio.gather(*(collect(stub, generate_request(p, rng.randrange(60, 81), stream=True))
                                                  for p in prompts))
                await wait_all_free(stub)
            return results, [await _admitted(a) for a in decode]

        results, admitted = run(main())
    finally:
        for child in reversed(children):
            stop(child)
    assert all(done.finish_reason == "length" for _, done in results)
    assert sum(admitted) == 12 and sorted(admitted)[0] >= 5, admitted
