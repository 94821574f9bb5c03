"""The multi-turn workload without a server: the seeded prompt builder (a shared system prompt, each turn the
previous prompt + its output + new user ids, context stops), the per-turn summary and table on hand-computed
synthetic records, the CLI's validation, and the conversation runner against an in-process fake of the
Generate stream (queue order, concurrency, arrival gaps, failed and cut turns)."""

import asyncio
import json
import time

import grpc
import numpy as np
import pytest

from sparsepd.loadtest.config import LengthRange, MultiTurnConfig
from sparsepd.loadtest.conversation import CONTEXT, DONE, FAILED, TIME, make_plan, next_prompt
from sparsepd.loadtest.metrics import CUT, RequestRecord, cache_summary, turn_summary
from sparsepd.loadtest.multiturn import run_conversations
from sparsepd.loadtest.report import multi_turn_lines, turn_table
from sparsepd.loadtest.runner import PointSettings, Progress
from sparsepd.loadtest.workload import ModelFacts
from sparsepd.proto import sglang_scheduler_pb2 as pb

approx = lambda x: pytest.approx(x, rel=1e-9, abs=1e-6)
MODEL = ModelFacts(vocab_size=260, max_context_length=1024, special_ids=frozenset({256, 257}))
SPEC = MultiTurnConfig(conversations=3, turns=3, system_len=40, user_len=8)


def test_defaults_match_the_documented_workload():
    spec = MultiTurnConfig()
    assert (spec.conversations, spec.turns, spec.system_len, spec.user_len, spec.requests) == (64, 4, 2048, 256, 256)


def test_plan_shares_the_system_prompt_and_is_seeded():
    plan = make_plan(SPEC, LengthRange(low=4, high=4), MODEL, seed=5)
    again = make_plan(SPEC, LengthRange(low=4, high=4), MODEL, seed=5)
    other = make_plan(SPEC, LengthRange(low=4, high=4), MODEL, seed=6)
    assert len(plan.system_ids) == 40 and plan.system_ids == again.system_ids != other.system_ids
    starts = [plan.start(i) for i in range(3)]
    for c in starts:
        assert (c.turn, c.output_len, len(c.prompt)) == (1, 4, 48)
        assert c.prompt[:40] == plan.system_ids and c.prompt[40:] == plan.user_turn(c.index, 1)[0]
    assert len({c.prompt[40:] for c in starts}) == 3  # each conversation its own user tokens
    assert [c.prompt for c in starts] == [again.start(i).prompt for i in range(3)]
    ids = {i for c in starts for i in c.prompt} | {i for t in range(1, 4) for i in plan.user_turn(0, t)[0]}
    assert ids <= set(range(260)) - {256, 257}
    # a turn's draw depends on (seed, conversation, turn), not on the order turns are asked for
    assert plan.user_turn(2, 3) == again.user_turn(2, 3) and plan.user_turn(2, 3) != plan.user_turn(2, 2)


def test_each_turn_is_the_previous_prompt_its_output_and_new_user_ids():
    plan = make_plan(SPEC, LengthRange(low=4, high=4), MODEL, seed=0)
    c = plan.start(1)
    first = c.prompt
    plan.advance(c, [7, 8, 9, 10])
    assert (c.turn, c.ended, len(c.prompt)) == (2, None, 48 + 4 + 8)
    assert c.prompt == (*first, 7, 8, 9, 10, *plan.user_turn(1, 2)[0])
    second = c.prompt
    plan.advance(c, (1, 2, 3, 4))
    assert c.turn == 3 and c.prompt == next_prompt(second, (1, 2, 3, 4), plan.user_turn(1, 3)[0])
    assert len(c.prompt) == 60 + 4 + 8
    plan.advance(c, [5, 6, 7, 8])
    assert (c.turn, c.ended) == (3, DONE)  # the last turn completed: nothing more to send
    assert next_prompt((1, 2), [3], (4, 5)) == (1, 2, 3, 4, 5)


@pytest.mark.parametrize("context, turns_sent", [(76, 3), (75, 2), (64, 2), (63, 1)])
def test_a_conversation_stops_before_a_turn_that_does_not_fit(context, turns_sent):
    # prompt + output per turn: turn 1 48 + 4 = 52, turn 2 60 + 4 = 64, turn 3 72 + 4 = 76
    plan = make_plan(SPEC, LengthRange(low=4, high=4), ModelFacts(260, context, frozenset({256, 257})), seed=0)
    c = plan.start(0)
    sent = 1
    while c.ended is None:
        plan.advance(c, [1, 2, 3, 4])
        sent += c.ended is None
    assert sent == turns_sent and c.ended == (DONE if turns_sent == 3 else CONTEXT)


def test_a_first_turn_beyond_the_context_is_refused_by_name():
    with pytest.raises(ValueError, match=r"--system-len 40 \+ --user-len 8 \+ --output-len 4-9 can reach 57 .* 56"):
        make_plan(SPEC, LengthRange(low=4, high=9), ModelFacts(260, 56, frozenset()), seed=0)


def _rec(turn, status="OK", prompt=0, cached=0, ttft=0.1, e2e=0.5):
    return RequestRecord(start_s=0.0, end_s=e2e, chunk_times_s=[ttft], chunk_tokens=[4], status=status,
                         input_tokens=prompt, output_tokens=4, cached_tokens=cached, turn=turn, conversation=0)


def _synthetic():
    return [_rec(1, prompt=48, cached=0, ttft=0.10, e2e=0.30), _rec(1, prompt=48, cached=32, ttft=0.20, e2e=0.50),
            _rec(1, prompt=48, cached=32, ttft=0.40, e2e=0.60),
            _rec(2, prompt=60, cached=48, ttft=0.05, e2e=0.20), _rec(2, status="UNAVAILABLE", prompt=60),
            _rec(2, status=CUT, prompt=60), RequestRecord(start_s=0.0, end_s=1.0)]  # no turn: left out


def test_turn_summary_on_hand_computed_records():
    turns = turn_summary(_synthetic(), turns=3)
    assert [(t["turn"], t["sent"], t["completed"], t["failed"], t["cut"]) for t in turns] == [
        (1, 3, 3, 0, 0), (2, 3, 1, 1, 1), (3, 0, 0, 0, 0)]
    one, two, three = turns
    assert one["ttft_ms"] == {"mean": approx(700 / 3), "p50": approx(200), "p90": approx(360), "p99": approx(396)}
    assert one["e2e_ms"]["p50"] == approx(500)
    assert (one["prompt_tokens"], one["cached_tokens"], one["prefill_tokens"]) == (144, 64, 80)
    assert one["prompt_tokens_mean"] == approx(48) and one["cached_tokens_mean"] == approx(64 / 3)
    assert one["hit_rate"] == approx(64 / 144)
    # only the completed request counts in turn 2's figures
    assert (two["prompt_tokens"], two["cached_tokens"], two["prefill_tokens"], two["hit_rate"]) == (60, 48, 12, 0.8)
    assert two["ttft_ms"]["p99"] == approx(50)
    assert three["hit_rate"] is None and three["ttft_ms"]["p50"] is None and three["prefill_tokens"] == 0
    json.dumps(turns, allow_nan=False)
    assert [t["turn"] for t in turn_summary(_synthetic())] == [1, 2]  # without `turns`: up to the last seen
    total = cache_summary([r for r in _synthetic() if r.status == "OK"])
    assert (total["prompt_tokens"], total["cached_tokens"], total["prefill_tokens"]) == (204, 112, 92)
    assert total["hit_rate"] == approx(112 / 204) and cache_summary([])["hit_rate"] is None


def test_turn_table_and_summary_lines():
    turns = turn_summary(_synthetic(), turns=3)
    header, *rows = turn_table(turns)
    assert header.split()[:4] == ["turn", "sent", "ok", "TTFT"] and len(rows) == 3
    assert rows[0].split() == ["1", "3", "3", "200.0", "360.0", "396.0", "500.0", "48.0", "21.3", "0.444", "80"]
    assert rows[2].split() == ["3", "0", "0", "-", "-", "-", "-", "-", "-", "-", "0"]
    metrics = {"turns": turns, "output_throughput": 12.5,
               "prefix_cache": cache_summary([r for r in _synthetic() if r.status == "OK"]),
               "conversations": {"count": 3, "ended": {DONE: 1, CONTEXT: 2, FAILED: 0, TIME: 0},
                                 "turns_not_sent": {CONTEXT: 3, FAILED: 0, TIME: 0},
                                 "context_stop_turns": {"2": 1, "3": 1}}}
    lines = multi_turn_lines(metrics)
    assert "hit rate 0.549 (112 of 204 prompt tokens cached), 92 prefill tokens computed, 12.5 output tokens/s" \
        in lines[-3]
    assert lines[-2] == "# conversations: 3, ended: 1 done, 2 context"
    assert lines[-1] == ("# stopped early at the context length: 2 conversations (1 before turn 2, 1 before turn 3), "
                         "3 turns not sent")


@pytest.mark.parametrize("argv, why", [
    (["--workload", "multi-turn", "--sweep", "1,2"], "--sweep is for the single-turn workload"),
    (["--workload", "multi-turn", "--dataset", "x.jsonl"], "--dataset is for the single-turn workload"),
    (["--workload", "multi-turn", "--num-prompts", "8"], "--num-prompts is for the single-turn workload"),
    (["--workload", "multi-turn", "--input-len", "64"], "--input-len is for the single-turn workload"),
    (["--workload", "multi-turn", "--turns", "0"], "--turns 0: expected ≥ 1"),
    (["--workload", "multi-turn", "--system-len", "-1"], "--system-len -1: expected ≥ 0"),
    (["--conversations", "8"], "--conversations is for --workload multi-turn"),
    (["--user-len", "8"], "--user-len is for --workload multi-turn"),
])
def test_bad_multi_turn_options_are_refused_by_name(argv, why):
    from sparsepd.deploy.cli import build_parser
    from sparsepd.loadtest.main import config_from_args

    with pytest.raises(ValueError, match=why):
        config_from_args(build_parser().parse_args(["loadtest", *argv]))


def test_cli_defaults_and_options_reach_the_config():
    from sparsepd.deploy.cli import build_parser
    from sparsepd.loadtest.main import config_from_args

    def cfg(*argv):
        return config_from_args(build_parser().parse_args(["loadtest", *argv]))

    single = cfg()
    assert single.multi_turn is None and single.input_len == LengthRange(low=512, high=512)
    multi = cfg("--workload", "multi-turn", "--max-concurrency", "8", "--request-rate", "4")
    assert multi.multi_turn == MultiTurnConfig() and multi.output_len == LengthRange(low=128, high=128)
    assert multi.prompts_for(8) == 256 and multi.concurrencies == (8,) and multi.request_rate == 4
    small = cfg("--workload", "multi-turn", "--conversations", "3", "--turns", "2", "--system-len", "0",
                "--user-len", "5", "--output-len", "2")
    assert small.multi_turn == MultiTurnConfig(conversations=3, turns=2, system_len=0, user_len=5)


class FakeScheduler:
    """Generate as a stub would stream it, in-process: after `delay_s`, one chunk per output token and a
    GenerateComplete whose output ids are derived from the prompt, and whose cached_tokens is the longest
    prefix shared with any earlier prompt (a cache of every prompt, none of the outputs). `fail` maps
    request-id suffixes ("0-t2") to a status code; `hang` suffixes never answer."""

    def __init__(self, delay_s=0.0, fail=None, hang=()):
        self.delay_s, self.fail, self.hang = delay_s, fail or {}, hang
        self.seen: list[tuple[int, ...]] = []
        self.order: list[str] = []
        self.in_flight = self.most_in_flight = 0

    def Generate(self, request, timeout=None):  # noqa: N802 (the stub's method name)
        return self._stream(request)

    async def _stream(self, request):
        prompt = tuple(request.tokenized.input_ids)
        suffix = request.request_id.split("-", 1)[-1]  # "mt-0-t1" → "0-t1"
        self.order.append(suffix)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay_s)
            if suffix in self.hang:
                await asyncio.sleep(3600)
            if suffix in self.fail:
                raise grpc.aio.AioRpcError(self.fail[suffix], grpc.aio.Metadata(), grpc.aio.Metadata(), "refused")
            cached = max((_common(prompt, p) for p in self.seen), default=0)
            self.seen.append(prompt)
            n = request.sampling_params.max_new_tokens
            output = [(sum(prompt) + i) % 250 for i in range(n)]
            for i, token in enumerate(output):
                yield pb.GenerateResponse(chunk=pb.GenerateStreamChunk(token_ids=[token], prompt_tokens=len(prompt),
                                                                       completion_tokens=i + 1, cached_tokens=cached))
            yield pb.GenerateResponse(complete=pb.GenerateComplete(
                output_ids=output, finish_reason="length", prompt_tokens=len(prompt), completion_tokens=n,
                cached_tokens=cached))
        finally:
            self.in_flight -= 1


def _common(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _run(fake, plan, concurrency=None, gaps=None, max_seconds=30.0, drain_seconds=5.0):
    settings = PointSettings(concurrency, max_seconds, drain_seconds, 30.0, 0.0, 0, "mt")
    prompts = {}

    def keep(conversation, turn, prompt, record):
        prompts[conversation, turn] = prompt

    n = plan.conversations * plan.turns
    gaps = np.zeros(n) if gaps is None else gaps
    result = asyncio.run(run_conversations(fake, plan, gaps, settings, Progress("t", n, enabled=False), keep))
    return result, prompts


def test_runner_queues_conversations_in_order_and_builds_every_prompt():
    plan = make_plan(SPEC, LengthRange(low=4, high=4), MODEL, seed=1)
    fake = FakeScheduler()
    result, prompts = _run(fake, plan, concurrency=1)
    # one at a time: first turns in order, then each conversation rejoins the queue's tail
    assert fake.order == ["0-t1", "1-t1", "2-t1", "0-t2", "1-t2", "2-t2", "0-t3", "1-t3", "2-t3"]
    assert fake.most_in_flight == 1 and all(c.ended == DONE and c.sent == 3 for c in result.conversations)
    by_turn = {(r.conversation, r.turn): r for r in result.records}
    for (c, t), r in by_turn.items():
        assert r.status == "OK" and r.input_tokens == len(prompts[c, t]) == 48 + (t - 1) * 12
        assert prompts[c, t][:40] == plan.system_ids and r.output_ids == [(sum(prompts[c, t]) + i) % 250
                                                                          for i in range(4)]
        if t > 1:
            assert prompts[c, t] == (*prompts[c, t - 1], *by_turn[c, t - 1].output_ids, *plan.user_turn(c, t)[0])
            assert r.cached_tokens == len(prompts[c, t - 1])  # the fake caches prompts: the previous one
    assert [by_turn[c, 1].cached_tokens for c in range(3)] == [0, 40, 40]  # then the shared system prompt
    turns = turn_summary(result.records, 3)
    assert [t["hit_rate"] for t in turns] == [approx(80 / 144), approx(144 / 180), approx(180 / 216)]
    assert result.summary() == {"count": 3, "ended": {DONE: 3, CONTEXT: 0, FAILED: 0, TIME: 0},
                                "turns_not_sent": {CONTEXT: 0, FAILED: 0, TIME: 0}, "context_stop_turns": {}}


def test_runner_keeps_to_the_concurrency_limit_and_the_arrival_gaps():
    plan = make_plan(SPEC, LengthRange(low=2, high=2), MODEL, seed=2)
    fake = FakeScheduler(delay_s=0.05)
    result, _ = _run(fake, plan, concurrency=2)
    assert fake.most_in_flight == 2 and len(result.records) == 9
    fake = FakeScheduler()
    started = time.perf_counter()
    result, _ = _run(fake, plan, gaps=np.full(9, 0.04))
    starts = sorted(r.start_s for r in result.records)
    assert np.all(np.diff(starts) >= 0.04 - 1e-3) and time.perf_counter() - started >= 8 * 0.04


def test_a_failed_turn_ends_its_conversation_and_the_others_go_on():
    plan = make_plan(SPEC, LengthRange(low=2, high=2), MODEL, seed=3)
    fake = FakeScheduler(fail={"1-t2": grpc.StatusCode.INVALID_ARGUMENT})
    result, prompts = _run(fake, plan, concurrency=1)
    assert "1-t3" not in fake.order and len(result.records) == 8
    assert [c.ended for c in result.conversations] == [DONE, FAILED, DONE]
    assert result.summary()["turns_not_sent"] == {CONTEXT: 0, FAILED: 1, TIME: 0}
    assert [(t["sent"], t["completed"], t["failed"]) for t in turn_summary(result.records, 3)] == [
        (3, 3, 0), (3, 2, 1), (2, 2, 0)]


def test_context_stops_and_the_time_bound_are_counted():
    model = ModelFacts(260, 64, frozenset({256, 257}))  # turn 2 (60 + 4) fits, turn 3 (72 + 4) does not
    result, _ = _run(FakeScheduler(), make_plan(SPEC, LengthRange(low=4, high=4), model, seed=4))
    assert [c.ended for c in result.conversations] == [CONTEXT] * 3 and len(result.records) == 6
    assert result.summary()["context_stop_turns"] == {"3": 3}
    assert result.summary()["turns_not_sent"] == {CONTEXT: 3, FAILED: 0, TIME: 0}

    fake = FakeScheduler(hang={"0-t2"})
    result, _ = _run(fake, make_plan(SPEC, LengthRange(low=2, high=2), MODEL, seed=4), concurrency=1,
                     max_seconds=0.3, drain_seconds=0.1)
    assert fake.order == ["0-t1", "1-t1", "2-t1", "0-t2"]  # one slot, held by the hung turn until the bound
    assert [r.status for r in result.records] == ["OK", "OK", "OK", CUT]
    assert [c.ended for c in result.conversations] == [TIME] * 3
    assert result.not_sent(TIME) == 9 - 4


def test_help_explains_the_multi_turn_options(capsys):
    from sparsepd.deploy.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["loadtest", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines to the terminal's width
    assert exit_.value.code == 0
    for option in ("--workload {single-turn,multi-turn}", "--conversations", "--turns", "--system-len", "--user-len"):
        assert option in out
    assert "turn k+1 = turn k's prompt + its output ids" in out and "hit rate = sum(cached) / sum(prompt tokens)" in out
    assert "--workload multi-turn --conversations 64 --turns 4 --system-len 2048" in out


def test_an_error_in_a_turn_hook_is_raised_not_swallowed():
    plan = make_plan(SPEC, LengthRange(low=2, high=2), MODEL, seed=5)

    def broken(conversation, turn, prompt, record):
        if (conversation, turn) == (1, 2):
            raise RuntimeError("hook failed at conversation 1 turn 2")

    settings = PointSettings(None, 30.0, 5.0, 30.0, 0.0, 0, "mt")
    started = time.perf_counter()
    with pytest.raises(RuntimeError, match="conversation 1 turn 2"):
        asyncio.run(run_conversations(FakeScheduler(), plan, np.zeros(9), settings, Progress("t", 9, enabled=False),
                                      broken))
    assert time.perf_counter() - started < 5  # the other conversations finished; nothing waited for the bound
