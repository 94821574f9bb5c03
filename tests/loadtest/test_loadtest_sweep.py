"""`sparsepd loadtest` against a real `sparsepd serve` (tiny, CPU, 127.0.0.1, free ports): a 2-point sweep
writes parseable JSONL with every metric and PNG charts; a dataset's bad prompts count as errors by status;
the time bound cuts long requests and the server gets every page back; `--launch` from the command line
starts and stops its own server."""

import json
import subprocess
import sys
import time

import grpc
import pytest

from sparsepd.deploy.cli import main
from sparsepd.deploy.launch import start, stop
from sparsepd.proto import sglang_scheduler_pb2 as pb
from sparsepd.proto import sglang_scheduler_pb2_grpc as pb_grpc

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STATS = {"mean", "p50", "p90", "p99"}


@pytest.fixture(scope="module")
def router():
    child = start("serve", ["serve", "--preset", "tiny", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1"])
    try:
        yield child.ready["grpc"]
    finally:
        stop(child, timeout_s=30)


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_two_point_sweep_writes_jsonl_and_plots(router, tmp_path, capsys):
    results = tmp_path / "sweep.jsonl"
    code = main(["loadtest", "--router", router, "--sweep", "1,2", "--input-len", "8-24", "--output-len", "6",
                 "--num-prompts", "4", "--results", str(results), "--label", "pd", "--slo-ttft-ms", "60000",
                 "--slo-tpot-ms", "60000", "--seed", "3", "--no-progress", "--plot"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "TTFT p50" in out and f"wrote {tmp_path / 'sweep'}_throughput.png" in out
    records = _records(results)
    assert [r["config"]["concurrency"] for r in records] == [1, 2]
    for r in records:
        assert (r["label"], r["preset"], r["model"]) == ("pd", "tiny", "sparsepd/tiny")
        assert r["server"]["workers"] == {"prefill": 1, "decode": 1} and r["server"]["launched"] is False
        assert r["config"]["input_len"] == [8, 24] and r["config"]["request_rate"] is None
        m = r["metrics"]
        assert (m["sent"], m["completed"], m["errors"], m["cut"], m["not_sent"]) == (4, 4, {}, 0, 0)
        assert m["total_output_tokens"] == 24 and 4 * 8 <= m["total_input_tokens"] <= 4 * 24
        for name in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
            assert set(m[name]) == STATS and 0 < m[name]["p50"] <= m[name]["p99"], name
        assert m["ttft_ms"]["p99"] < m["e2e_ms"]["p99"]
        assert m["output_throughput"] == pytest.approx(24 / m["duration_s"])
        assert m["good_requests"] == 4 and m["goodput"] == pytest.approx(m["request_throughput"])
        assert m["router"]["transfer_bytes_mean"] > 0 and m["router"]["transfer_ms"]["p50"] > 0
    for kind in ("throughput", "latency"):
        png = tmp_path / f"sweep_{kind}.png"
        assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 10_000

    # the same prompts for the same seed: the second series ends up with the same token counts
    code = main(["loadtest", "--router", router, "--max-concurrency", "4", "--input-len", "8-24", "--output-len", "6",
                 "--num-prompts", "4", "--results", str(results), "--label", "other", "--seed", "3", "--no-progress",
                 "--warmup-requests", "0"])
    assert code == 0
    again = _records(results)[-1]
    assert again["metrics"]["total_input_tokens"] == records[0]["metrics"]["total_input_tokens"]
    code = main(["loadtest", "--plot-only", str(results), "--plot", str(tmp_path / "both"), "--label", "pd",
                 "--label", "other"])
    assert code == 0 and (tmp_path / "both_latency.png").read_bytes()[:8] == PNG_MAGIC


def test_dataset_prompts_and_errors_by_status(router, tmp_path):
    dataset = tmp_path / "prompts.jsonl"
    dataset.write_text('{"input_ids": [1, 2, 3, 4, 5], "output_len": 3}\n{"prompt": "Hello there"}\n'
                       '{"input_ids": [1, 999]}\n')  # 999 ≥ vocab_size 260: INVALID_ARGUMENT
    results = tmp_path / "dataset.jsonl"
    code = main(["loadtest", "--router", router, "--dataset", str(dataset), "--output-len", "4", "--num-prompts", "6",
                 "--max-concurrency", "3", "--request-rate", "40", "--warmup-requests", "0", "--results", str(results),
                 "--no-progress"])
    assert code == 0
    (record,) = _records(results)
    m = record["metrics"]
    assert (m["sent"], m["completed"], m["errors"]) == (6, 4, {"INVALID_ARGUMENT": 2})
    assert m["total_output_tokens"] == 2 * 3 + 2 * 4
    assert m["total_input_tokens"] > 2 * 5  # the text prompt's tokens, as the router counted them
    assert record["config"]["request_rate"] == 40 and record["config"]["dataset"] == str(dataset)


def test_time_bound_cuts_requests_and_the_server_frees_everything(router, tmp_path):
    results = tmp_path / "cut.jsonl"
    started = time.monotonic()
    code = main(["loadtest", "--router", router, "--input-len", "8", "--output-len", "600", "--max-concurrency", "2",
                 "--num-prompts", "6", "--max-seconds", "0.3", "--drain-seconds", "0.5", "--warmup-requests", "0",
                 "--results", str(results), "--no-progress"])
    assert code == 1  # no request completed
    assert time.monotonic() - started < 30
    m = _records(results)[0]["metrics"]
    assert (m["sent"], m["completed"], m["cut"], m["not_sent"], m["errors"]) == (2, 0, 2, 4, {})
    assert m["duration_s"] < 5
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


def test_cli_launch_sweep(tmp_path):
    results = tmp_path / "cli.jsonl"
    out = subprocess.run([sys.executable, "-m", "sparsepd", "loadtest", "--launch", "--sweep", "1,2", "--input-len",
                          "16", "--output-len", "8", "--num-prompts", "3", "--results", str(results), "--plot",
                          "--label", "cli"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "launching: sparsepd serve" in out.stderr and "stopped the launched server (exit code 0)" in out.stderr
    rows = [line for line in out.stdout.splitlines() if line.split()[:1] in (["1"], ["2"])]
    assert len(rows) == 2, out.stdout
    records = _records(results)
    assert [r["config"]["concurrency"] for r in records] == [1, 2]
    assert all(r["server"]["launched"] and r["server"]["serve_args"] == [] for r in records)
    assert all(r["metrics"]["completed"] == 3 and r["metrics"]["total_output_tokens"] == 24 for r in records)
    assert (tmp_path / "cli_throughput.png").read_bytes()[:8] == PNG_MAGIC
