"""`sparsepd loadtest --workload multi-turn` against a real `sparsepd serve` (tiny, CPU, 127.0.0.1, free ports):
every turn succeeds; each turn's prompt is exactly the previous prompt, the server's output ids for it and
the new user ids, and every conversation begins with the same system ids; the JSONL record and the printed
table hold one row per turn with the right counts and hit rates; every turn after the first is restored from the
previous one by the prefill worker's prefix cache; the server gets every page back."""

import functools
import json
import time

import grpc
import pytest

from sparsepd.deploy.cli import main
from sparsepd.deploy.launch import start, stop
from sparsepd.loadtest import multiturn
from sparsepd.model_config import get_preset
from sparsepd.proto import sglang_scheduler_pb2 as pb
from sparsepd.proto import sglang_scheduler_pb2_grpc as pb_grpc

CONVERSATIONS, TURNS, SYSTEM_LEN, USER_LEN, OUTPUT_LEN = 3, 3, 40, 8, 4
PAGE = get_preset("tiny").page_size


@pytest.fixture(scope="module")
def router():
    child = start("serve", ["serve", "--preset", "tiny", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1"])
    try:
        yield child.ready["grpc"]
    finally:
        stop(child, timeout_s=30)


def test_multi_turn_run_resends_each_conversation_and_reports_per_turn(router, tmp_path, capsys, monkeypatch):
    turns = {}  # (conversation, turn) → (prompt ids, record), through the runner's hook

    def keep(conversation, turn, prompt, record):
        turns[conversation, turn] = (prompt, record)

    monkeypatch.setattr(multiturn, "run_conversations", functools.partial(multiturn.run_conversations, on_turn=keep))
    results = tmp_path / "multi.jsonl"
    code = main(["loadtest", "--router", router, "--workload", "multi-turn", "--conversations", str(CONVERSATIONS),
                 "--turns", str(TURNS), "--system-len", str(SYSTEM_LEN), "--user-len", str(USER_LEN), "--output-len",
                 str(OUTPUT_LEN), "--request-rate", "20", "--max-concurrency", "2", "--seed", "11", "--results",
                 str(results), "--label", "mt", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0, out

    assert sorted(turns) == [(c, t) for c in range(CONVERSATIONS) for t in range(1, TURNS + 1)]
    system = turns[0, 1][0][:SYSTEM_LEN]
    for (c, t), (prompt, record) in turns.items():
        assert record.status == "OK" and (record.conversation, record.turn) == (c, t)
        assert record.input_tokens == len(prompt)  # as the server counted it
        assert record.output_tokens == len(record.output_ids) == OUTPUT_LEN
        assert 0 <= record.cached_tokens <= record.input_tokens
        assert prompt[:SYSTEM_LEN] == system  # the same system ids in every conversation
        if t == 1:
            assert len(prompt) == SYSTEM_LEN + USER_LEN
        else:
            before, previous = turns[c, t - 1]
            assert len(prompt) == len(before) + OUTPUT_LEN + USER_LEN
            assert prompt[:len(before) + OUTPUT_LEN] == (*before, *previous.output_ids)
            # the prefill worker's prefix cache holds the previous turn up to its last page boundary
            assert record.cached_tokens == len(before) // PAGE * PAGE > 0
    assert len({turns[c, 1][0][SYSTEM_LEN:] for c in range(CONVERSATIONS)}) == CONVERSATIONS

    (record,) = [json.loads(line) for line in results.read_text().splitlines()]
    c = record["config"]
    assert (c["workload"], c["conversations"], c["turns"], c["system_len"], c["user_len"]) == (
        "multi-turn", CONVERSATIONS, TURNS, SYSTEM_LEN, USER_LEN)
    assert (c["input_len"], c["output_len"], c["num_prompts"], c["concurrency"], c["request_rate"]) == (
        None, [OUTPUT_LEN, OUTPUT_LEN], 9, 2, 20)
    m = record["metrics"]
    assert (m["sent"], m["completed"], m["errors"], m["cut"], m["not_sent"]) == (9, 9, {}, 0, 0)
    assert m["total_output_tokens"] == 9 * OUTPUT_LEN and m["output_throughput"] > 0
    prompt_lens = [SYSTEM_LEN + USER_LEN + (t - 1) * (OUTPUT_LEN + USER_LEN) for t in range(1, TURNS + 1)]
    assert [(t["turn"], t["sent"], t["completed"], t["failed"], t["cut"]) for t in m["turns"]] == [
        (t, CONVERSATIONS, CONVERSATIONS, 0, 0) for t in range(1, TURNS + 1)]
    for t, length in zip(m["turns"], prompt_lens, strict=True):
        assert t["prompt_tokens"] == CONVERSATIONS * length and t["prompt_tokens_mean"] == length
        assert 0 < t["hit_rate"] < 1 if t["turn"] > 1 else 0 <= t["hit_rate"] < 1
        assert t["prefill_tokens"] == t["prompt_tokens"] - t["cached_tokens"]
        assert t["cached_tokens"] == sum(r.cached_tokens for (_, turn), (_, r) in turns.items() if turn == t["turn"])
        assert 0 < t["ttft_ms"]["p50"] <= t["ttft_ms"]["p99"] < t["e2e_ms"]["p99"]
    cache = m["prefix_cache"]
    assert cache["prompt_tokens"] == CONVERSATIONS * sum(prompt_lens) == m["total_input_tokens"]
    assert 0 <= cache["hit_rate"] <= 1 and cache["prefill_tokens"] == cache["prompt_tokens"] - cache["cached_tokens"]
    assert m["conversations"]["ended"] == {"done": 3, "context": 0, "failed": 0, "time": 0}

    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["turn", "sent"])
    assert [line.split()[:3] for line in lines[header + 1:header + 1 + TURNS]] == [
        [str(t), "3", "3"] for t in range(1, TURNS + 1)]
    assert "# overall: hit rate" in out and "# conversations: 3, ended: 3 done" in out

    with grpc.insecure_channel(router) as channel:
        stub = pb_grpc.SglangSchedulerStub(channel)
        deadline = time.monotonic() + 20
        while True:
            loads = stub.GetLoads(pb.GetLoadsRequest()).loads
            if all(w.free_pages == w.num_pages and w.free_slots == w.num_slots for w in loads) or \
                    time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert [(w.free_pages, w.free_slots) for w in loads] == [(w.num_pages, w.num_slots) for w in loads]
