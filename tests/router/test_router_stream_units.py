"""Units of the router's streaming path: a flow hands its stream the first token at once and then
`stream_interval` tokens at a time (the rest before its end), in order; the stream sends a choice's first tokens
as a chunk of their own even when its reader falls behind; the router's timing lines and their summary."""

from __future__ import annotations

import asyncio
import json

import pytest

from sparsepd.proto import worker_pb2
from sparsepd.router.flow import Flow, Outcome
from sparsepd.router.params import RequestSpec
from sparsepd.router.service import SchedulerService
from sparsepd.router.timing import RequestTiming, TimingLog, read, summarize


def _flow(interval: int, index: int = 0) -> Flow:
    spec = RequestSpec("r", [1, 2, 3], worker_pb2.SamplingParams(max_new_tokens=100), 100, stream=True, index=index)
    return Flow(spec, stream_interval=interval)


def _events(flow: Flow) -> list[list[int]]:
    out = []
    while not flow.events.empty():
        kind, payload = flow.events.get_nowait()
        assert kind == "tokens"
        out.append(list(payload))
    return out


@pytest.mark.parametrize("interval", [1, 3, 4])
def test_hand_over_sends_the_first_token_at_once_then_interval_tokens_at_a_time(interval):
    async def scenario():
        flow = _flow(interval)
        steps = [[10], [11], [12, 13], [14], [15], [16], [17, 18, 19], [20]]  # a step may bring several
        sent = []
        for i, tokens in enumerate(steps):
            flow.hand_over(list(tokens), first=i == 0)
            sent += _events(flow)
        held = list(flow.held)
        flow.hand_over_held()
        sent += _events(flow)
        return sent, held, flow.held

    sent, held_before_end, held_after = asyncio.run(scenario())
    assert [t for chunk in sent for t in chunk] == list(range(10, 21))  # every token, in order, once
    assert sent[0] == [10] and held_after == []
    if interval == 1:
        assert sent == [[10], [11], [12, 13], [14], [15], [16], [17, 18, 19], [20]]
    else:
        assert all(len(chunk) >= interval for chunk in sent[1:-1]), sent
        assert len(held_before_end) < interval and sent[-1] == held_before_end != []


def test_a_stream_that_falls_behind_still_sends_the_first_token_alone_then_merges_what_waits():
    """Everything is queued before the stream reads (a reader slower than the worker): the first token is a chunk
    of its own, the held chunks behind it go out as one, the complete last; for n = 2 each choice the same."""
    async def scenario(n: int):
        flows = [_flow(4, index) for index in range(n)]
        for index, flow in enumerate(flows):
            for tokens in ([10 + index], [11, 12, 13, 14], [15, 16, 17, 18], [19]):
                flow.output_ids.extend(tokens)
                flow.events.put_nowait(("tokens", tokens))
            flow.events.put_nowait(("end", Outcome("length")))
        service = object.__new__(SchedulerService)  # _stream needs only the flows
        return [r async for r in service._stream(flows, RequestTiming("r", arrival_unix_s=0.0, arrival_s=0.0))]

    for n in (1, 2):
        responses = asyncio.run(scenario(n))
        for index in range(n):
            mine = [r for r in responses if (r.chunk.index if r.HasField("chunk") else r.complete.index) == index]
            chunks = [list(r.chunk.token_ids) for r in mine if r.HasField("chunk")]
            assert chunks == [[10 + index], list(range(11, 20))], (n, chunks)
            assert [r.chunk.completion_tokens for r in mine[:-1]] == [1, 10]
            assert mine[-1].HasField("complete") and list(mine[-1].complete.output_ids) == [10 + index,
                                                                                             *range(11, 20)]


def test_timing_records_and_summary(tmp_path):
    log = TimingLog(tmp_path / "t" / "timing.jsonl")
    t = RequestTiming("a", arrival_unix_s=1000.0, arrival_s=0.0)
    t.emit_ms, t.chunk_tokens, t.end_ms = [50.0, 60.0, 80.0], [1, 1, 2], 81.0
    log.write(t)
    u = RequestTiming("b", arrival_unix_s=1000.5, arrival_s=0.0)
    u.emit_ms, u.chunk_tokens, u.end_ms, u.status = [40.0], [1], None, "CANCELLED"
    log.write(u)
    later = RequestTiming("c", arrival_unix_s=2000.0, arrival_s=0.0)
    later.emit_ms, later.chunk_tokens, later.end_ms = [10.0, 30.0], [1, 1], 30.0
    log.write(later)
    log.close()
    log.write(later)  # after close: nothing, no error
    lines = [json.loads(x) for x in (tmp_path / "t" / "timing.jsonl").read_text().splitlines()]
    assert [x["request_id"] for x in lines] == ["a", "b", "c"]
    assert lines[0] == {"request_id": "a", "arrival_unix_s": 1000.0, "status": "OK", "tokens": 4,
                        "emit_ms": [50.0, 60.0, 80.0], "chunk_tokens": [1, 1, 2], "end_ms": 81.0}
    window = read(tmp_path / "t" / "timing.jsonl", 999.0, 1500.0)
    assert [x["request_id"] for x in window] == ["a", "b"]
    s = summarize(window)  # the cancelled one is left out
    assert s["completed"] == 1 and s["ttft_mean"] == 50.0 and s["e2e_p50"] == 81.0
    assert s["tpot_mean"] == pytest.approx((81.0 - 50.0) / 3)  # 3 tokens after the first chunk
    assert s["out_tok_s"] == pytest.approx(4 / 0.081) and s["tok_per_chunk"] == pytest.approx(4 / 3)
    assert summarize([]) == {"completed": 0}


def test_a_decode_workers_terminal_speculative_counts_reach_generate_complete():
    """The decode worker's terminal event carries the request's draft tokens verified and accepted; the router
    puts them in GenerateComplete's spec_draft_tokens / spec_accepted_tokens (SGLang's fields), and a request
    without speculation reports zeros."""
    from sparsepd.router.dispatch import Dispatcher
    from sparsepd.router.service import SchedulerService
    from sparsepd.router.stage import Stage
    from sparsepd.router.workers import WorkerPool

    async def scenario():
        d = Dispatcher(WorkerPool([], []))
        flows = {}
        for rid, counts in (("spec", (9, 7)), ("plain", (0, 0))):
            spec = RequestSpec(rid, [1, 2, 3], worker_pb2.SamplingParams(max_new_tokens=3), 3, stream=True)
            flow = flows[rid] = Flow(spec)
            d.flows[flow.request_id] = d.by_worker_id[flow.worker_id] = flow
            d._deliver(flow, [10], "")  # the prefill's first token
            flow.stage = Stage.DECODING
            d._apply_decode_event(flow, worker_pb2.TokenEvent(request_id=flow.worker_id, token_ids=[11]))
            d._apply_decode_event(flow, worker_pb2.TokenEvent(
                request_id=flow.worker_id, token_ids=[12], finish_reason="length",
                spec_draft_tokens=counts[0], spec_accepted_tokens=counts[1]))
            assert flow.ended and flow.output_ids == [10, 11, 12]
        got = {rid: SchedulerService._complete(None, f, f.outcome).complete for rid, f in flows.items()}
        assert (got["spec"].spec_draft_tokens, got["spec"].spec_accepted_tokens) == (9, 7)
        assert (got["plain"].spec_draft_tokens, got["plain"].spec_accepted_tokens) == (0, 0)
        assert got["spec"].finish_reason == "length" and list(got["spec"].output_ids) == [10, 11, 12]

    asyncio.run(scenario())
