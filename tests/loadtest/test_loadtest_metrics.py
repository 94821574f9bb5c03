"""Load-test arithmetic on synthetic timestamps, checked against hand-computed values: TTFT, ITL, TPOT (none
for 1-token outputs), E2E, percentiles by linear interpolation, throughput, goodput under SLOs, errors
by status; and the seeded workload, arrivals, CLI validation, table and plot series."""

import json
import math

import numpy as np
import pytest

from sparsepd.loadtest.config import LengthRange, parse_sweep
from sparsepd.loadtest.metrics import CUT, RequestRecord, summarize
from sparsepd.loadtest.plot import series
from sparsepd.loadtest.report import table_header, table_row
from sparsepd.loadtest.workload import ModelFacts, arrival_offsets_s, file_prompts, random_prompts

approx = lambda x: pytest.approx(x, rel=1e-9, abs=1e-6)


def _ok(start, chunks, tokens, end, inputs, transfer_bytes=0, transfer_ms=0.0):
    return RequestRecord(start_s=start, end_s=end, chunk_times_s=chunks, chunk_tokens=tokens, input_tokens=inputs,
                         output_tokens=sum(tokens), finish_reason="length", queue_ms=1.0, prefill_ms=2.0,
                         transfer_ms=transfer_ms, server_ttft_ms=5.0, transfer_bytes=transfer_bytes)


def _records():
    a = _ok(10.0, [10.1, 10.3, 10.6], [1, 1, 1], 10.6, 10, 1000, 1.0)  # TTFT 100, ITL 200 300, TPOT 250, E2E 600
    b = _ok(11.0, [11.2, 11.55], [1, 3], 11.55, 20, 2000, 2.0)  # TTFT 200, ITL 350 (one gap), TPOT 350/3, E2E 550
    c = _ok(12.0, [12.4], [1], 12.45, 30, 3000, 3.0)  # TTFT 400, no ITL, no TPOT (1 token), E2E 450
    failed = [RequestRecord(start_s=13.0, end_s=13.01, status=s, error="x")
              for s in ("RESOURCE_EXHAUSTED", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED")]
    cut = RequestRecord(start_s=14.0, end_s=14.5, chunk_times_s=[14.1], chunk_tokens=[1], status=CUT)
    return [a, b, c, *failed, cut]


def test_latencies_and_hand_computed_percentiles():
    m = summarize(_records(), duration_s=4.0)
    # TTFT [100, 200, 400]: p90 at rank 0.9·2 = 1.8 → 200 + 0.8·200; p99 at 1.98
    assert m["ttft_ms"] == {"mean": approx(700 / 3), "p50": approx(200), "p90": approx(360), "p99": approx(396)}
    # ITL: every chunk gap [200, 300, 350] (b's 3-token chunk is one gap); p99 at rank 1.98 → 300 + 0.98·50
    assert m["itl_ms"] == {"mean": approx(850 / 3), "p50": approx(300), "p90": approx(340), "p99": approx(349)}
    # TPOT [250, 350/3] only: c generated one token
    lo, hi = 350 / 3, 250.0
    assert m["tpot_ms"] == {"mean": approx((lo + hi) / 2), "p50": approx((lo + hi) / 2),
                            "p90": approx(lo + 0.9 * (hi - lo)), "p99": approx(lo + 0.99 * (hi - lo))}
    assert m["e2e_ms"] == {"mean": approx(1600 / 3), "p50": approx(550), "p90": approx(590), "p99": approx(599)}


def test_throughput_errors_cut_and_router_numbers():
    m = summarize(_records(), duration_s=4.0, not_sent=2)
    assert (m["sent"], m["completed"], m["cut"], m["not_sent"]) == (7, 3, 1, 2)
    assert m["errors"] == {"DEADLINE_EXCEEDED": 1, "RESOURCE_EXHAUSTED": 2}
    assert (m["total_input_tokens"], m["total_output_tokens"]) == (60, 8)
    assert m["request_throughput"] == approx(0.75) and m["input_throughput"] == approx(15.0)
    assert m["output_throughput"] == approx(2.0) and m["total_token_throughput"] == approx(17.0)
    assert m["mean_concurrency"] == approx(1.6 / 4)
    assert m["tokens_per_chunk"] == approx(8 / 6)
    assert m["goodput"] is None and m["good_requests"] is None
    router = m["router"]
    assert router["transfer_bytes_mean"] == approx(2000) and router["transfer_bytes_total"] == 6000
    assert router["transfer_gb_per_s"] == approx(6000 / 0.006 / 1e9)
    assert router["transfer_ms"]["p50"] == approx(2.0) and router["queue_ms"]["mean"] == approx(1.0)
    json.dumps(m, allow_nan=False)


@pytest.mark.parametrize("ttft, tpot, good", [(250, None, 2), (None, 200, 2), (250, 200, 1), (50, None, 0),
                                              (None, 100, 1)])
def test_goodput_counts_requests_meeting_every_slo(ttft, tpot, good):
    # TTFT 100, 200, 400; TPOT 250, 116.7, none (a 1-token output meets any TPOT SLO)
    m = summarize(_records(), duration_s=4.0, slo_ttft_ms=ttft, slo_tpot_ms=tpot)
    assert m["good_requests"] == good and m["goodput"] == approx(good / 4.0)
    assert m["slo"] == {"ttft_ms": ttft, "tpot_ms": tpot}


def test_one_token_outputs_have_no_tpot():
    records = [_ok(0.0, [0.05], [1], 0.06, 4), _ok(1.0, [1.2], [1], 1.2, 4)]
    assert records[1].tpot_s is None and records[1].itls_s == []
    m = summarize(records, duration_s=2.0, slo_tpot_ms=1.0)
    assert m["tpot_ms"] == {"mean": None, "p50": None, "p90": None, "p99": None}
    assert m["itl_ms"]["p99"] is None and m["ttft_ms"]["p50"] == approx(125)
    assert m["good_requests"] == 2


def test_tpot_divides_by_the_tokens_after_a_multi_token_first_chunk():
    # A recorded stream of 32 tokens whose first chunk holds 4 (decode steps that finished before the first token
    # reached the router), then 28 one-token chunks 50 ms apart: 28 × 50 ms of decoding after TTFT is 50 ms per
    # token, not 28 × 50 / 31 (the old output − 1 divisor, 45.2 ms).
    chunks = [10.2 + 0.05 * i for i in range(29)]
    r = _ok(10.0, chunks, [4] + [1] * 28, chunks[-1], 63)
    assert r.output_tokens == 32 and r.ttft_s == approx(0.2)
    assert r.tpot_s == approx(0.05)
    m = summarize([r], duration_s=1.6)
    assert m["tpot_ms"]["mean"] == approx(50.0) and m["itl_ms"]["mean"] == approx(50.0)
    assert m["tokens_per_chunk"] == approx(32 / 29) and m["output_throughput"] == approx(20.0)
    # everything in the first chunk: no token came after it, so there is no TPOT
    assert _ok(0.0, [0.3], [5], 0.31, 4).tpot_s is None


def test_requests_generate_exactly_their_length_and_never_the_stop_ids():
    from sparsepd.loadtest.client import generate_request
    from sparsepd.loadtest.config import parse_ids
    from sparsepd.loadtest.workload import Prompt

    assert parse_ids("1,5,128-131", "--stop-token-ids") == (1, 5, 128, 129, 130, 131)
    for bad in ("", "a", "5-2", "1,,2", "-3"):
        with pytest.raises(ValueError, match="--stop-token-ids"):
            parse_ids(bad, "--stop-token-ids")
    sp = generate_request(Prompt((1, 2, 3), None, 32), "r", 0.0, 7, (128, 129)).sampling_params
    # min = max new tokens (the gateway's min_tokens = max_tokens): EOS and stop ids are masked for every token
    assert (sp.max_new_tokens, sp.min_new_tokens, sp.ignore_eos, list(sp.stop_token_ids)) == (32, 32, True, [128, 129])


def test_nothing_completed_gives_empty_stats_and_zero_throughput():
    m = summarize([RequestRecord(start_s=0.0, end_s=0.1, status="UNAVAILABLE")], duration_s=0.1)
    assert m["completed"] == 0 and m["errors"] == {"UNAVAILABLE": 1} and m["request_throughput"] == 0
    assert m["ttft_ms"]["mean"] is None and m["router"]["transfer_gb_per_s"] is None
    json.dumps(m, allow_nan=False)
    assert len(table_row(4, m)) == len(table_header()) and table_row(4, m).split()[:5] == ["4", "1", "0", "1", "0"]


def test_single_value_percentiles_and_table_row():
    m = summarize([_ok(0.0, [0.01, 0.03], [1, 1], 0.03, 8, 4096, 0.5)], duration_s=0.5, slo_ttft_ms=100)
    assert m["ttft_ms"] == {"mean": approx(10), "p50": approx(10), "p90": approx(10), "p99": approx(10)}
    row = table_row(None, m).split()
    assert row[:5] == ["inf", "1", "1", "0", "0"] and row[-4:] == ["2.00", "4", "0.5", "-"]


MODEL = ModelFacts(vocab_size=260, max_context_length=1024, special_ids=frozenset({256, 257}))


def test_random_prompts_are_seeded_in_range_and_avoid_special_ids():
    a = random_prompts(50, LengthRange(low=3, high=40), LengthRange(low=2, high=5), MODEL, seed=7)
    b = random_prompts(50, LengthRange(low=3, high=40), LengthRange(low=2, high=5), MODEL, seed=7)
    c = random_prompts(50, LengthRange(low=3, high=40), LengthRange(low=2, high=5), MODEL, seed=8)
    assert a == b and a != c
    assert {p.input_len for p in a} <= set(range(3, 41)) and len({p.input_len for p in a}) > 10
    assert {p.output_len for p in a} == {2, 3, 4, 5}
    ids = {i for p in a for i in p.input_ids}
    assert ids <= set(range(260)) - {256, 257} and len(ids) > 200
    fixed = random_prompts(5, LengthRange(low=16, high=16), LengthRange(low=8, high=8), MODEL, seed=0)
    assert {(p.input_len, p.output_len) for p in fixed} == {(16, 8)}
    with pytest.raises(ValueError, match="context length is 1024"):
        random_prompts(1, LengthRange(low=1000, high=1000), LengthRange(low=25, high=25), MODEL, seed=0)


def test_dataset_prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"input_ids": [1, 2, 3], "output_len": 4}\n\n{"prompt": "Hello"}\n')
    prompts = file_prompts(str(path), 3, LengthRange(low=9, high=9), seed=0)
    assert [(p.input_ids, p.text, p.output_len) for p in prompts] == [
        ((1, 2, 3), None, 4), (None, "Hello", 9), ((1, 2, 3), None, 4)]
    path.write_text('{"input_ids": [1]}\n{"text": 3}\n')
    with pytest.raises(ValueError, match=r"prompts.jsonl:2: expected an object"):
        file_prompts(str(path), 1, LengthRange(low=9, high=9), seed=0)


def test_arrivals_poisson_seeded_or_all_at_once():
    assert arrival_offsets_s(5, math.inf, seed=0, point=0).tolist() == [0.0] * 5
    a = arrival_offsets_s(20000, 4.0, seed=1, point=0)
    assert a[0] == 0.0 and np.all(np.diff(a) >= 0)
    assert np.array_equal(a, arrival_offsets_s(20000, 4.0, seed=1, point=0))
    assert not np.array_equal(a, arrival_offsets_s(20000, 4.0, seed=1, point=1))
    gaps = np.diff(a)
    assert gaps.mean() == pytest.approx(0.25, rel=0.03) and gaps.std() == pytest.approx(0.25, rel=0.03)


def test_length_and_sweep_parsing():
    assert LengthRange.parse("256", "--x") == LengthRange(low=256, high=256)
    assert LengthRange.parse("2048-8192", "--x") == LengthRange(low=2048, high=8192)
    for bad, why in (("0", "≥ 1"), ("8-2", "upper end"), ("a", "expected N or LOW-HIGH"), ("1-2-3", "LOW-HIGH")):
        with pytest.raises(ValueError, match=why):
            LengthRange.parse(bad, "--input-len")
    assert parse_sweep("1,2,4,256") == (1, 2, 4, 256)
    for bad in ("", "0,1", "1,x"):
        with pytest.raises(ValueError, match="--sweep"):
            parse_sweep(bad)


@pytest.mark.parametrize("argv, why", [
    (["--label", "a", "--label", "b"], "--label given 2 times"),
    (["--sweep", "1,2", "--max-concurrency", "4"], "not both"),
    (["--router", "localhost"], "HOST:PORT"),
    (["--serve-args", "--preset tiny"], "only used with --launch"),
    (["--request-rate", "0"], "request_rate"),
])
def test_bad_options_are_refused_by_name(argv, why):
    from sparsepd.deploy.cli import build_parser
    from sparsepd.loadtest.main import config_from_args

    with pytest.raises(ValueError, match=why):
        config_from_args(build_parser().parse_args(["loadtest", *argv]))


def test_plot_series_take_each_labels_latest_run():
    def rec(label, run_id, ts, c):
        return {"label": label, "run_id": run_id, "timestamp": ts, "config": {"concurrency": c, "num_prompts": 16}}

    records = [rec("pd", "old", "2026-01-01T00:00:00", 1), rec("pd", "new", "2026-01-02T00:00:00", 4),
               rec("pd", "new", "2026-01-02T00:00:01", 2), rec("colocated", "x", "2026-01-01T00:00:00", 1)]
    out = series(records)
    assert list(out) == ["colocated", "pd"]
    assert [r["config"]["concurrency"] for r in out["pd"]] == [2, 4]
    assert list(series(records, ["colocated"])) == ["colocated"]


def test_speculative_acceptance_is_summed_over_completed_requests_and_shown_in_the_row():
    records = _records()
    records[0].spec_draft_tokens, records[0].spec_accepted_tokens = 6, 5
    records[1].spec_draft_tokens, records[1].spec_accepted_tokens = 4, 1
    records[3].spec_draft_tokens, records[3].spec_accepted_tokens = 100, 0  # a failed request: not counted
    m = summarize(records, duration_s=4.0)
    assert m["speculative"] == {"draft_tokens": 10, "accepted_tokens": 6, "accept_rate": approx(0.6)}
    assert table_row(4, m).split()[-1] == "0.600" and table_header().split()[-1] == "accept"
    off = summarize(_records(), duration_s=4.0)
    assert off["speculative"]["accept_rate"] is None and table_row(4, off).split()[-1] == "-"
    json.dumps(m, allow_nan=False)


def test_the_cli_prints_a_refusal_as_one_line_naming_the_option(capsys):
    """A refusal from a pydantic model reaches the terminal as its message alone: no echoed input, no link."""
    from sparsepd.deploy.cli import main

    assert main(["loadtest", "--serve-args=--preset tiny"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "pydantic" not in err and "input_value" not in err
    assert err == "error: --serve-args is only used with --launch"
