"""Real prefill and decode workers with `--speculative-num-steps` (the default model's MTP layer): the prefill
ships the MTP layer's ring with the state, greedy tokens equal the single-process engine without speculation,
the decode worker's Stats report drafted and accepted tokens, and its pools return to full."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "disagg"))
from driver import run_requests, stats  # noqa: E402

from sparsepd.default_model import DEFAULT_CHECKPOINT  # noqa: E402
from sparsepd.deploy.launch import start, stop  # noqa: E402
from sparsepd.engine.generate import generate  # noqa: E402
from sparsepd.engine.pools import kv_row_bytes  # noqa: E402
from sparsepd.engine.sampling import SamplingParams  # noqa: E402
from sparsepd.engine.state_io import shipped_bytes  # noqa: E402
from sparsepd.load_options import LoadOptions, resolve_model_config  # noqa: E402
from sparsepd.model.weights import build_model  # noqa: E402

ARGS = ["--checkpoint", str(DEFAULT_CHECKPOINT), "--num-slots", "8", "--max-batch-tokens", "256", "--num-pages", "96",
        "--speculative-num-steps", "2"]
SAMPLING = dict(max_new_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def workers():
    decode = start("decode", ["decode-worker", *ARGS, "--zmq-endpoint", "tcp://127.0.0.1:0"])
    prefill = None
    try:
        prefill = start("prefill", ["prefill-worker", *ARGS, "--transfer-timeout", "5"])
        yield decode, prefill
    finally:
        for child in (prefill, decode):
            if child is not None:
                stop(child)


def test_speculative_decode_worker_matches_the_engine_and_reports_acceptance(workers):
    decode, prefill = workers
    text = (DEFAULT_CHECKPOINT / "heldout_sample.txt").read_bytes()
    prompts = {f"r{i}": list(text[i * 131: i * 131 + n]) for i, n in enumerate([5, 17, 40, 64, 90])}
    cfg = resolve_model_config("tiny", str(DEFAULT_CHECKPOINT), LoadOptions())
    model = build_model(cfg, checkpoint=str(DEFAULT_CHECKPOINT))
    want = {rid: generate(model, ids, SamplingParams(**SAMPLING)).output_ids for rid, ids in prompts.items()}
    got = asyncio.run(run_requests(prefill.ready["grpc"], decode.ready["grpc"], prompts, SAMPLING))
    assert {rid: o["tokens"] for rid, o in got.items()} == want
    assert all(o["finish"] == "length" and not o["error"] for o in got.values())
    ring = cfg.window * kv_row_bytes(cfg)  # the MTP layer's SWA ring travels beside the model's state
    assert all(o["transfer_bytes"] == shipped_bytes(cfg, len(prompts[rid])) + ring for rid, o in got.items())
    deadline = time.monotonic() + 5
    while True:
        s = asyncio.run(stats(decode.ready["grpc"], "decode"))
        if (s.free_pages, s.free_slots) == (s.num_pages, s.num_slots):
            break
        assert time.monotonic() < deadline, f"the decode worker holds {s.num_pages - s.free_pages} pages"
        time.sleep(0.1)
    spec = s.speculative
    assert spec.num_steps == 2 and len(spec.accept_lengths) == 3
    assert spec.drafted > 0 and 0 < spec.accepted <= spec.drafted
    assert sum(spec.accept_lengths) == spec.verifications
    assert sum(a * n for a, n in enumerate(spec.accept_lengths)) == spec.accepted
    # each request's terminal event carries its own counts (GenerateComplete's spec_* fields): they add up to the
    # worker's, which served these requests alone
    per_request = [o["spec"] for o in got.values()]
    assert all(0 <= a <= d for d, a in per_request) and sum(d > 0 for d, _ in per_request) >= 4
    assert (sum(d for d, _ in per_request), sum(a for _, a in per_request)) == (spec.drafted, spec.accepted)
