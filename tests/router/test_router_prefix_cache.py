"""Prefix caching through the service (engine/prefix_cache.py, router/placement.py): conversations whose turns
resend the previous turn's prompt and output get the previous turn's prefix restored on the prefill worker
that holds it (cache-aware routing over two prefill workers), report it as `cached_tokens`, and stream the
single-process reference's tokens; so do requests that share only a part of their prompts (the radix tree);
`--disable-prefix-cache` reports none; every pool is full again after."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import grpc
import torch

sys.path.insert(0, str(Path(__file__).parent))
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

from sparsepd.cluster_token import AuthorizedStub, token_from_env  # noqa: E402
from sparsepd.deploy.launch import start, stop  # noqa: E402
from sparsepd.engine.generate import generate  # noqa: E402
from sparsepd.engine.sampling import SamplingParams  # noqa: E402
from sparsepd.model.weights import build_model  # noqa: E402
from sparsepd.model_config import get_preset  # noqa: E402
from sparsepd.proto import worker_pb2, worker_pb2_grpc  # noqa: E402
from sparsepd.router.placement import Placement  # noqa: E402

PAGE = get_preset("tiny").page_size
NEW = 5


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


async def _prefill_stats(address: str) -> worker_pb2.StatsResponse:
    async with grpc.aio.insecure_channel(address) as ch:
        return await AuthorizedStub(worker_pb2_grpc.PrefillWorkerStub(ch), token_from_env()).Stats(
            worker_pb2.StatsRequest())


async def _conversation(stub, first: list[int], turns: int, seed: int) -> list[tuple[list[int], object]]:
    """Each turn: the previous prompt + its output + new tokens; returns (prompt, complete) per turn."""
    prompt, out = first, []
    for turn in range(turns):
        chunks, done = await collect(stub, generate_request(prompt, NEW, stream=True))
        assert all(c.cached_tokens == done.cached_tokens for c in chunks)
        out.append((prompt, done))
        prompt = prompt + list(done.output_ids) + _ids(6 + turn, seed=seed + turn)
    return out


def _check(model, conversations, cached: bool) -> None:
    for turns in conversations:
        for k, (prompt, done) in enumerate(turns):
            want = generate(model, prompt, SamplingParams(max_new_tokens=NEW, ignore_eos=True)).output_ids
            assert list(done.output_ids) == want, (k, len(prompt))
            expect = len(turns[k - 1][0]) // PAGE * PAGE if k and cached else 0
            assert done.cached_tokens == expect, (k, len(prompt), done.cached_tokens)
            assert done.prompt_tokens == len(prompt)


def test_conversations_hit_the_prefill_worker_that_holds_them():
    model = build_model(get_preset("tiny"), seed=0)
    served = start("serve", ["serve", "--preset", "tiny",
                             "--port", "0", "--metrics-port", "0", "--prefill", "2", "--decode", "1",
                             "--num-slots", "8", "--num-pages", "96", "--batch-tokens", "256"], timeout_s=240)
    try:
        async def main():
            async with channel(served.ready["grpc"]) as ch:
                stub = stub_of(ch)
                conversations = await asyncio.gather(*(_conversation(stub, _ids(40 + 7 * c, seed=c), 3, 100 * c)
                                                       for c in range(3)))
                await wait_all_free(stub)
            return conversations, [await _prefill_stats(a) for a in served.ready["prefill"]]

        conversations, stats = run(main())
    finally:
        assert stop(served, timeout_s=30) == 0
    _check(model, conversations, cached=True)
    hits = sum(done.cached_tokens for turns in conversations for _, done in turns)
    assert sum(s.prefix_cache.hit_tokens for s in stats) == hits > 0
    assert all(s.prefix_cache.enabled and s.prefix_cache.entries > 0 for s in stats if s.transfers_ok)


def test_a_shared_prefix_hits_on_the_worker_whose_tree_holds_it():
    """Requests A and B share a 400-token prefix and differ after it (a system prompt before different user
    turns): B reports the shared prefix rounded down to the page as cached, on the prefill worker A went to (the
    router matches B against the restore points that worker reports), and both stream the reference's tokens."""
    model = build_model(get_preset("tiny"), seed=0)
    prefix = _ids(403, seed=77)
    a, b = prefix + _ids(40, seed=78), prefix + _ids(40, seed=79)
    served = start("serve", ["serve", "--preset", "tiny", "--port", "0", "--metrics-port", "-1", "--prefill", "2",
                             "--decode", "1",
                             "--num-slots", "8", "--num-pages", "96"], timeout_s=240)
    try:
        async def main():
            async with channel(served.ready["grpc"]) as ch:
                stub = stub_of(ch)
                done = [(await collect(stub, generate_request(p, NEW, stream=True)))[1] for p in (a, b, a[:300])]
                await wait_all_free(stub)
            return done, [await _prefill_stats(x) for x in served.ready["prefill"]]

        (done_a, done_b, done_c), stats = run(main())
    finally:
        assert stop(served, timeout_s=30) == 0
    for prompt, done in ((a, done_a), (b, done_b), (a[:300], done_c)):
        want = generate(model, prompt, SamplingParams(max_new_tokens=NEW, ignore_eos=True)).output_ids
        assert list(done.output_ids) == want
    assert (done_a.cached_tokens, done_b.cached_tokens, done_c.cached_tokens) == (0, 400, 288)
    holder = max(stats, key=lambda s: s.prefix_cache.hit_tokens)
    assert holder.prefix_cache.hit_tokens == 400 + 288 and holder.prefix_cache.hits == 2
    assert holder.prefix_cache.entries > 0 and holder.prefix_cache.pages >= len(a) // PAGE
    assert holder.prefix_cache.num_bytes > 0


def test_disable_prefix_cache_computes_every_prompt_token():
    model = build_model(get_preset("tiny"), seed=0)
    children = []
    try:
        children.append(start("decode", ["decode-worker", *WORKER_ARGS]))
        children.append(start("prefill", ["prefill-worker", *WORKER_ARGS, "--disable-prefix-cache"]))
        children.append(start_router(children[1].ready["grpc"], children[0].ready["grpc"]))

        async def main():
            async with channel(children[2].ready["grpc"]) as ch:
                stub = stub_of(ch)
                conversation = await _conversation(stub, _ids(37, seed=9), 2, 900)
                await wait_all_free(stub)
            return conversation, await _prefill_stats(children[1].ready["grpc"])

        conversation, stats = run(main())
    finally:
        for child in reversed(children):
            stop(child)
    _check(model, [conversation], cached=False)
    assert not stats.prefix_cache.enabled


class _Worker:
    role = "prefill"

    def __init__(self, index: int, queued: int, cached: set[int]):
        self.index, self.queued_tokens, self.cached, self.alive = index, queued, frozenset(cached), True


def test_cache_aware_choice_prefers_the_holder_unless_it_is_overloaded():
    placement = Placement(page_size=16)
    hashes = [11, 12, 13, 14]  # a 64-token prefix (and its shorter ones)
    a, b = _Worker(0, 0, {11, 12, 13}), _Worker(1, 0, {11})
    assert placement.cached_prefill([a, b], hashes, 70, balance_tokens=512) is a
    busy = _Worker(0, 600, {11, 12, 13})
    assert placement.cached_prefill([busy, b], hashes, 70, balance_tokens=512) is None  # the least loaded, then
    assert placement.cached_prefill([a, b], hashes, 1000, balance_tokens=512) is None  # 48 of 1000: not worth it
    a.alive = False
    assert placement.cached_prefill([a, b], hashes, 20, balance_tokens=512) is b


def test_colocated_workers_cache_prefixes_too():
    model = build_model(get_preset("tiny"), seed=0)
    served = start("serve", ["serve", "--preset", "tiny",
                             "--port", "0", "--metrics-port", "-1", "--colocated", "--decode", "1",
                             "--num-slots", "8", "--num-pages", "96"], timeout_s=240)
    try:
        async def main():
            async with channel(served.ready["grpc"]) as ch:
                stub = stub_of(ch)
                conversations = await asyncio.gather(*(_conversation(stub, _ids(30 + 9 * c, seed=50 + c), 3, 70 * c)
                                                       for c in range(2)))
                await wait_all_free(stub)
            return conversations

        conversations = run(main())
    finally:
        assert stop(served, timeout_s=30) == 0
    _check(model, conversations, cached=True)
