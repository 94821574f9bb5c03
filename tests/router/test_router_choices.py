"""n > 1 through the real service (router + prefill + decode processes, and a colocated worker): one prefill,
n sequences, each on its own decode slot. Every choice equals an independent single-process run with its
seed (`choice_seed`), chunks and completes carry their choice's index, a seeded request repeats itself, an
abort ends all n, and every page and slot is free afterwards."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import grpc
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from router_helpers import channel, generate_request, run, start_router, stub_of, wait_all_free  # noqa: E402

from sparsepd.deploy.launch import start, stop  # noqa: E402
from sparsepd.engine.generate import generate  # noqa: E402
from sparsepd.engine.sampling import SamplingParams  # noqa: E402
from sparsepd.model.weights import build_model  # noqa: E402
from sparsepd.model_config import get_preset  # noqa: E402
from sparsepd.proto import sglang_scheduler_pb2 as pb  # noqa: E402
from sparsepd.router.params import choice_seed  # noqa: E402

PROMPT = [256, *b"three ways to say it"]
MAX_NEW = 10
SAMPLED = dict(temperature=1.0, top_k=40, seed=1234)


@pytest.fixture(scope="module")
def model():
    return build_model(get_preset("tiny"), seed=0)


def _reference(model, n: int, **sampling) -> list[list[int]]:
    seed = sampling.pop("seed", None)
    out = []
    for i in range(n):
        extra = {} if seed is None else {"seed": seed if i == 0 else choice_seed(seed, i)}
        params = SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True, **sampling, **extra)
        out.append(generate(model, PROMPT, params).output_ids)
    return out


async def _choices(stub, request) -> tuple[dict[int, list[int]], dict[int, pb.GenerateComplete]]:
    """Tokens streamed per choice index, and each index's one complete."""
    streamed, completes = {}, {}
    async for response in stub.Generate(request, timeout=60):
        if response.HasField("chunk"):
            streamed.setdefault(response.chunk.index, []).extend(response.chunk.token_ids)
        else:
            assert response.complete.index not in completes, "two completes for one choice"
            completes[response.complete.index] = response.complete
        assert response.request_id == request.request_id
    return streamed, completes


def _request(n: int, stream: bool, request_id: str, **sampling) -> pb.GenerateRequest:
    request = generate_request(PROMPT, MAX_NEW, stream=stream, request_id=request_id, **sampling)
    request.sampling_params.n = n
    return request


def _check_served(stub_address: str, model) -> None:
    want_sampled, want_greedy = _reference(model, 3, **SAMPLED), _reference(model, 2)

    async def main():
        async with channel(stub_address) as ch:
            stub = stub_of(ch)
            results = await asyncio.gather(_choices(stub, _request(3, True, "s1", **SAMPLED)),
                                           _choices(stub, _request(3, False, "s2", **SAMPLED)),
                                           _choices(stub, _request(2, True, "g")))
            await wait_all_free(stub)
            return results

    (streamed, done), (_, again), (greedy_streamed, greedy) = run(main())
    assert sorted(done) == [0, 1, 2] and sorted(streamed) == [0, 1, 2]
    assert [list(done[i].output_ids) for i in range(3)] == want_sampled
    assert [streamed[i] for i in range(3)] == want_sampled
    assert [list(again[i].output_ids) for i in range(3)] == want_sampled  # the seed reproduces all three
    assert len({tuple(x) for x in want_sampled}) > 1
    assert [list(greedy[i].output_ids) for i in range(2)] == want_greedy == [greedy_streamed[i] for i in range(2)]
    assert all(d.finish_reason == "length" and d.prompt_tokens == len(PROMPT) for d in done.values())


def test_n_choices_equal_independent_runs_with_their_seeds(deployment, model):
    _check_served(deployment["router"], model)


def test_n_choices_on_a_colocated_worker(model):
    served = start("serve", ["serve", "--preset", "tiny",
                             "--colocated", "--port", "0", "--metrics-port", "-1", "--num-slots", "8",
                             "--num-pages", "64", "--max-batch-tokens", "16"], timeout_s=240)
    try:
        _check_served(served.ready["grpc"], model)
    finally:
        assert stop(served, timeout_s=30) == 0


def test_groups_that_find_half_their_room_wait_and_all_complete(model):
    """48 greedy n = 2 requests at once on a decode worker of 3 slots: a group often gets one slot of two, gives
    it back and is reserved again under the same ids. It must wait until the worker has the slot back (before,
    about one in ten was refused INVALID_ARGUMENT "already reserved"); every choice of every request completes
    with the reference's tokens."""
    want = _reference(model, 1)[0]
    args = ["--preset", "tiny", "--num-slots", "3", "--max-batch-tokens", "256", "--num-pages", "64"]
    children = []
    try:
        children.append(start("decode-3", ["decode-worker", *args]))
        children.append(start("prefill-3", ["prefill-worker", *args]))
        children.append(start_router(children[1].ready["grpc"], children[0].ready["grpc"], "--max-queue", "100"))

        async def main():
            async with channel(children[2].ready["grpc"]) as ch:
                stub = stub_of(ch)
                results = await asyncio.gather(*(_choices(stub, _request(2, i % 2 == 0, f"half-{i}"))
                                                 for i in range(48)), return_exceptions=True)
                await wait_all_free(stub, timeout=30)
                return results

        results = run(main())
    finally:
        for child in reversed(children):
            stop(child)
    failed = [r for r in results if isinstance(r, BaseException)]
    assert not failed, failed[:3]
    assert all([list(done[i].output_ids) for i in (0, 1)] == [want, want] for _, done in results)


def test_abort_ends_every_choice_and_frees_everything(deployment):
    async def main():
        async with channel(deployment["router"]) as ch:
            stub = stub_of(ch)
            request = _request(3, True, "abort-n", **SAMPLED)
            request.sampling_params.max_new_tokens = 400
            call = stub.Generate(request)
            first = await call.read()
            assert first.HasField("chunk")
            reply = await stub.Abort(pb.AbortRequest(request_id="abort-n"))
            rest = []
            while (response := await call.read()) != grpc.aio.EOF:
                rest.append(response)
            await wait_all_free(stub)
            return reply, rest

    reply, rest = run(main())
    completes = [r.complete for r in rest if r.HasField("complete")]
    assert reply.success
    assert sorted(c.index for c in completes) == [0, 1, 2]
    assert all(c.finish_reason == "abort" and len(c.output_ids) < 400 for c in completes)


@pytest.mark.parametrize("n", [65, 10_000])
def test_too_many_choices_is_invalid_argument(deployment, n):
    async def main():
        async with channel(deployment["router"]) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await _choices(stub_of(ch), _request(n, False, "too-many"))
            return err.value

    err = run(main())
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "sampling_params.n" in err.details()
