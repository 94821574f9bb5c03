"""n > 1 at every way its choices can end, through the public API (real processes on 127.0.0.1):

- one choice stops (a stop token only it samples) while the others run to max_new_tokens, streamed and not;
- the Abort RPC and a client cancel, before any choice ended and after one did: every choice still running
  ends at once (Abort: a complete with finish_reason "abort" each; cancel: the router counts each cancelled),
  whichever choice ended first; until then the request's id is in flight (a new request with it is refused);
- a choice's decode worker refusing its reservation, and a choice's state refused in the P→D transfer: the
  request fails once with the worker's reason, nothing streamed before;
- request ids at the longest the transfer carries with the choice and move suffixes (`<id>#<i>@<k>`), moved
  off a prefill worker that crashes with their batch; one character more is refused.

Every response is checked in order: per choice its chunks, then exactly one complete, nothing of it after;
every response carries the request's id; each choice's tokens equal an independent single-process run with
its seed (`choice_seed`); afterwards the router has nothing in flight and every page and slot is free.
"""

from __future__ import annotations

import functools
import sys
from collections import Counter
from pathlib import Path

import grpc
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from rel_helpers import (  # noqa: E402
    Fleet,
    channel,
    generate_request,
    router_counts,
    router_outcomes,
    run,
    sampled_reference,
    stub_of,
    wait_all_free,
    wait_worker_free,
)

from sparsepd.cluster_token import AuthorizedStub, token_from_env  # noqa: E402
from sparsepd.faults import CRASH_EXIT_CODE  # noqa: E402
from sparsepd.proto import sglang_scheduler_pb2 as pb  # noqa: E402
from sparsepd.proto import worker_pb2, worker_pb2_grpc  # noqa: E402
from sparsepd.proto.transfer import MAX_ID_CHARS  # noqa: E402
from sparsepd.router.params import choice_seed  # noqa: E402

PROMPT = [256, *b"choices end apart"]
N = 3
SEED, TEMPERATURE = 1, 1.0
# With SEED, choice 0 samples STOP_TOKEN as its 4th token; choices 1 and 2 never sample it in LONG tokens.
STOP_TOKEN, STOP_AT = 15, 3
SHORT, LONG = 12, 200  # LONG tokens take a choice ≥ 4 s at the decode worker's 20 ms a step


@pytest.fixture(scope="module")
def fleet():
    fleet = Fleet()
    try:
        fleet.workers(decode=("decode", {"SPARSEPD_FAULTS": "decode.step=delay:0.02"}, []),
                      p_plain=("prefill", None, []),
                      p_truncate=("prefill", {"SPARSEPD_TRANSFER_FAULT": "truncate@1"}, []),
                      p_crash=("prefill", {"SPARSEPD_FAULTS": "prefill.step=crash"}, []))
        decode = [fleet["decode"]]
        # r_move lists the crashing worker first: with nothing queued the router picks it
        fleet.routers(r_plain=([fleet["p_plain"]], decode, []), r_truncate=([fleet["p_truncate"]], decode, []),
                      r_move=([fleet["p_crash"], fleet["p_plain"]], decode, []))
        yield fleet
    finally:
        fleet.stop_all()


@functools.cache
def _want(i: int, max_new: int, prompt: tuple[int, ...] = tuple(PROMPT)) -> list[int]:
    """Choice i's tokens run alone (its seed), without a stop token."""
    return sampled_reference(list(prompt), max_new, SEED if i == 0 else choice_seed(SEED, i), TEMPERATURE)


def _request(request_id: str, max_new: int, stream: bool, stop: bool = True, n: int = N,
             prompt: list[int] = PROMPT) -> pb.GenerateRequest:
    request = generate_request(prompt, max_new, stream=stream, request_id=request_id, temperature=TEMPERATURE,
                               seed=SEED, top_k=-1)
    request.sampling_params.n = n
    if stop:
        request.sampling_params.stop_token_ids.append(STOP_TOKEN)
    return request


async def _read_until(call, until=None) -> list[pb.GenerateResponse]:
    """Responses of `call` until EOF, or until `until(response)` is true (that response included)."""
    out = []
    while (response := await call.read()) != grpc.aio.EOF:
        out.append(response)
        if until is not None and until(response):
            break
    return out


def _by_choice(responses: list[pb.GenerateResponse], request_id: str, stream: bool,
               n: int = N) -> tuple[dict[int, list[int]], dict[int, pb.GenerateComplete]]:
    """Each choice's streamed tokens and its complete, checking the order of `responses`: per choice its chunks (none
    when not streaming, each counting the tokens so far), then exactly one complete, nothing of it after; every
    response with the request's id."""
    streamed, done = {i: [] for i in range(n)}, {}
    for k, response in enumerate(responses):
        kind = response.WhichOneof("response")
        body = getattr(response, kind)
        where = f"response {k} ({kind} of choice {body.index})"
        assert response.request_id == request_id, where
        assert body.index in streamed, where
        assert body.index not in done, f"{where} came after the choice's complete"
        if kind == "chunk":
            assert stream, f"{where}: a chunk in a request that does not stream"
            streamed[body.index] += body.token_ids
            assert body.completion_tokens == len(streamed[body.index]), where
        else:
            done[body.index] = body
    assert sorted(done) == list(range(n)), f"completes for choices {sorted(done)} of {n}"
    for i in range(n):
        assert streamed[i] == (list(done[i].output_ids) if stream else []), i
        assert done[i].completion_tokens == len(done[i].output_ids), i
    return streamed, done


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "unary"])
def test_a_choice_that_stops_first_ends_alone(fleet, stream):
    router = fleet["r_plain"]
    before = router_outcomes(router)
    rid = f"stop-first-{stream}"

    async def main():
        async with channel(router.ready["grpc"]) as ch:
            stub = stub_of(ch)
            responses = await _read_until(stub.Generate(_request(rid, SHORT, stream), timeout=60))
            await wait_all_free(stub)
            return responses

    responses = run(main())
    _, done = _by_choice(responses, rid, stream)
    assert list(done[0].output_ids) == _want(0, SHORT)[:STOP_AT + 1]
    assert (done[0].finish_reason, done[0].matched_token_id) == ("stop", STOP_TOKEN)
    for i in (1, 2):
        assert list(done[i].output_ids) == _want(i, SHORT) and done[i].finish_reason == "length", i
    assert responses[-1].complete.index != 0  # the stopped choice ended first; the others went on after it
    assert stream or len(responses) == N  # not streaming: its completes alone
    assert router_outcomes(router) - before == Counter({"stop": 1, "length": 2})


# (how, whether one choice has ended before it, stream): the stop token ends choice 0 after 4 tokens, or is not
# asked for (a unary request says nothing before its first choice ends: "before" streams only)
ENDS = [(how, True, stream) for how in ("abort", "cancel") for stream in (True, False)]
ENDS += [(how, False, True) for how in ("abort", "cancel")]


@pytest.mark.parametrize(("how", "one_ended", "stream"), ENDS,
                         ids=[f"{h}-{'after' if e else 'before'}-{'stream' if s else 'unary'}" for h, e, s in ENDS])
def test_abort_or_cancel_ends_every_running_choice(fleet, how, one_ended, stream):
    router = fleet["r_plain"]
    before = router_outcomes(router)
    rid = f"{how}-{'after' if one_ended else 'before'}-{stream}"

    def until(r):  # the point to abort at: choice 0's complete, or the first chunk
        return r.HasField("complete") if one_ended else r.HasField("chunk")

    async def main():
        async with channel(router.ready["grpc"]) as ch:
            stub = stub_of(ch)
            call = stub.Generate(_request(rid, LONG, stream, stop=one_ended), timeout=60)
            responses = await _read_until(call, until=until)
            same_id = stub.Generate(_request(rid, SHORT, stream=False, n=1), timeout=60)
            assert await _read_until_error(same_id) == []
            taken = await same_id.code(), await same_id.details()
            reply = None
            if how == "abort":
                reply = await stub.Abort(pb.AbortRequest(request_id=rid))
                responses += await _read_until(call)
            else:
                call.cancel()
            status = await call.code()
            await wait_all_free(stub, timeout=3)  # long before a choice still running could reach LONG tokens
            return responses, reply, status, taken

    responses, reply, status, taken = run(main())
    assert taken == (grpc.StatusCode.ALREADY_EXISTS, f"request_id {rid!r} is already in flight")  # choices still run
    ended = Counter({"stop": 1}) if one_ended else Counter()
    running = N - one_ended
    if how == "abort":
        assert reply.success, reply.message
        assert status == grpc.StatusCode.OK
        streamed, done = _by_choice(responses, rid, stream)
        aborted = [i for i in range(N) if done[i].finish_reason == "abort"]
        assert aborted == list(range(one_ended, N)), {i: done[i].finish_reason for i in range(N)}
        made = max(len(done[i].output_ids) for i in aborted)
        assert made < LONG
        for i in aborted:  # (a prefix of what it samples alone)
            assert list(done[i].output_ids) == _want(i, made)[:len(done[i].output_ids)], i
        ended["abort"] += running
    else:
        assert status == grpc.StatusCode.CANCELLED
        ended["cancelled"] += running
    if one_ended:
        first = next(r.complete for r in responses if r.HasField("complete"))
        assert (first.index, first.finish_reason, list(first.output_ids)) == (0, "stop", _want(0, SHORT)[:STOP_AT + 1])
    assert router_outcomes(router) - before == ended


def _decode_stub(ch):
    return AuthorizedStub(worker_pb2_grpc.DecodeWorkerStub(ch), token_from_env())


def test_a_choice_refused_by_its_decode_worker_fails_the_request(fleet):
    """The decode worker already holds choice 1's id (reserved there by hand): the group's reservation is refused
    for that choice, and the request fails INVALID_ARGUMENT with the worker's reason, nothing streamed; the other
    choice's reservation is given back."""
    router, decode = fleet["r_plain"], fleet["decode"]
    rid = "refused-choice"
    before = router_outcomes(router)

    async def main():
        async with channel(decode.ready["grpc"]) as dch, channel(router.ready["grpc"]) as ch:
            worker = _decode_stub(dch)
            await worker.Reserve(worker_pb2.ReserveRequest(request_id=f"{rid}#1", prompt_len=len(PROMPT),
                                                           sampling=worker_pb2.SamplingParams(max_new_tokens=4),
                                                           ttl_s=30), timeout=10)
            stub = stub_of(ch)
            call = stub.Generate(_request(rid, SHORT, stream=True, stop=False, n=2), timeout=60)
            responses = await _read_until_error(call)
            released = await worker.Release(worker_pb2.ReleaseRequest(request_id=f"{rid}#1"), timeout=10)
            await wait_all_free(stub)
            again = await _read_until(stub.Generate(_request(rid, SHORT, stream=True, stop=False, n=2), timeout=60))
            await wait_all_free(stub)
            return responses, await call.code(), await call.details(), released, again

    responses, code, details, released, again = run(main())
    assert responses == [] and code == grpc.StatusCode.INVALID_ARGUMENT, (responses, code, details)
    assert "already reserved" in details and f"{rid}#1" in details, details
    assert released.found
    _, done = _by_choice(again, rid, stream=True, n=2)  # the same id again: nothing of the first try is left
    assert [list(done[i].output_ids) for i in (0, 1)] == [_want(0, SHORT), _want(1, SHORT)]
    assert router_outcomes(router) - before == Counter({"invalid_argument": 2, "length": 2})


async def _read_until_error(call) -> list[pb.GenerateResponse]:
    """Responses of a call that must fail (its status is read afterwards)."""
    out = []
    with pytest.raises(grpc.aio.AioRpcError):
        while (response := await call.read()) != grpc.aio.EOF:
            out.append(response)
    return out


def test_a_choice_whose_state_is_refused_fails_the_request(fleet):
    """The prefill worker truncates the first state it ships (one of the group's): the decode worker refuses it, the
    request fails with that reason after at most each choice's first token (sent as soon as the prefill worker drew
    it, before the states' acknowledgements), and no complete; every page on both workers comes back, and the next
    request through the same workers gets its choices' tokens."""
    router = fleet["r_truncate"]
    before = router_outcomes(router)

    async def main():
        async with channel(router.ready["grpc"]) as ch:
            stub = stub_of(ch)
            call = stub.Generate(_request("truncated", SHORT, stream=True, stop=False), timeout=60)
            responses = await _read_until_error(call)
            await wait_all_free(stub)
            await wait_worker_free(fleet["p_truncate"])
            again = await _read_until(stub.Generate(_request("after-truncated", SHORT, stream=True), timeout=60))
            await wait_all_free(stub)
            return responses, await call.code(), await call.details(), again

    responses, code, details, again = run(main())
    assert code == grpc.StatusCode.UNAVAILABLE and all(r.HasField("chunk") for r in responses), (responses, code)
    firsts = [(r.chunk.index, list(r.chunk.token_ids)) for r in responses]
    assert len({i for i, _ in firsts}) == len(firsts) and all(t == _want(i, 1) for i, t in firsts), firsts
    assert "truncated" in details, details
    _, done = _by_choice(again, "after-truncated", stream=True)
    assert list(done[0].output_ids) == _want(0, SHORT)[:STOP_AT + 1]
    assert [list(done[i].output_ids) for i in (1, 2)] == [_want(1, SHORT), _want(2, SHORT)]
    assert router_outcomes(router) - before == Counter({"unavailable": N, "stop": 1, "length": 2})


def test_ids_at_the_length_limit_are_served_and_moved(fleet):
    """The longest id the router takes for n = 3 leaves room for `#2` and `@3` (--max-migrations 3): its choices are
    moved off the prefill worker that crashes with their batch (ids `<id>#<i>@1`) and end with their own tokens;
    one character more is refused at admission."""
    router = fleet["r_move"]
    longest = "x" * (MAX_ID_CHARS - len(f"#{N - 1}") - len("@3"))
    prompt = [256, *b"moved with the longest ids"]  # cached nowhere: the router picks the first prefill worker
    before = router_outcomes(router)

    async def main():
        async with channel(router.ready["grpc"]) as ch:
            stub = stub_of(ch)
            request = _request(longest, SHORT, stream=True, stop=False, prompt=prompt)
            responses = await _read_until(stub.Generate(request, timeout=60))
            await wait_all_free(stub, timeout=20)
            call = stub.Generate(_request(longest + "x", SHORT, stream=True), timeout=60)
            refused = await _read_until_error(call)
            return responses, refused, await call.code(), await call.details()

    responses, refused, code, details = run(main())
    assert fleet["p_crash"].proc.wait(10) == CRASH_EXIT_CODE  # the choices were moved, not served there
    _, done = _by_choice(responses, longest, stream=True)
    assert [list(done[i].output_ids) for i in range(N)] == [_want(i, SHORT, tuple(prompt)) for i in range(N)]
    assert refused == [] and code == grpc.StatusCode.INVALID_ARGUMENT and "'#2@3'" in details, details
    assert router_outcomes(router) - before == Counter({"length": N})
    assert router_counts(router, "migrations", "cause") == {"prefill": N}
    run(wait_worker_free(fleet["p_plain"]))
