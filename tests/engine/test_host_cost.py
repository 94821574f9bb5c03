"""The host work of a decode step grows linearly in the batch: counted in Python calls per request-step
(bench/bench_host.py's stand-in forward, the real scheduler, pools, page growth, prefix cache and metadata
builder), not timed. A membership test on the running list (O(batch) per request) made it O(batch²): at
batch 128 that is ~64 extra calls per request-step against ~65 in all, so the ratio below would be ~1.8.

The recorded counts are the figures of the code that set them (bench/RESULTS.md, "Engine speed II"): a change that
adds per-request work to the step fails here at more than 1.1× them; so does one that adds work to a speculative
step (verification, acceptance, undo log, drafts)."""

import importlib.util
import sys
from pathlib import Path

import pytest

# calls per request-step at batch 16 and 128 (context 200); calls per prompt token of chunked prefill (2 prompts of
# 1024 tokens, 512 a step). Before the host-cost pass of 2026-12-06: 79, 66 and 2.31; before the decode-worker pass
# (bench/RESULTS.md, "The decode worker's per-step host work"): 29.0, 22.1 and 2.21.
RECORDED = {16: 29.0, 128: 21.3}
RECORDED_PREFILL = 2.21

_BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_host.py"


@pytest.fixture(scope="module")
def bench_host():
    spec = importlib.util.spec_from_file_location("bench_host", _BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_calls_per_request_step_do_not_grow_with_the_batch(bench_host):
    small = bench_host.measure(16, context=200, steps=3)
    large = bench_host.measure(128, context=200, steps=3)
    assert small.retractions == large.retractions == 0
    for f in (small, large):
        assert f.calls_per_request_step <= 1.1 * RECORDED[f.batch], (
            f"{f.calls_per_request_step:.1f} calls per request-step at batch {f.batch}, recorded "
            f"{RECORDED[f.batch]}: more host work per request in a decode step")
    ratio = large.calls_per_request_step / small.calls_per_request_step
    assert ratio <= 1.1, (f"calls per request-step: {small.calls_per_request_step:.1f} at batch 16, "
                          f"{large.calls_per_request_step:.1f} at batch 128 (×{ratio:.2f}): host work grows "
                          "faster than the batch")


def test_page_growth_is_exercised(bench_host):
    """The staggered contexts make requests cross page boundaries during the counted steps, so `_grow`
    allocates (the growth path is part of what is counted)."""
    engine = bench_host.make_engine(8, context=200, steps=200)
    bench_host.start_decoding(engine, 8, context=200, max_new=200)
    pages = sum(len(r.pages) for r in engine.scheduler.running)
    for _ in range(130):
        engine.step()
    assert sum(len(r.pages) for r in engine.scheduler.running) > pages


def test_calls_per_prompt_token_of_chunked_prefill(bench_host):
    """The host work of chunked prefill steps (the eager metadata builder, the prefix cache's boundary snapshots)
    stays within 1.1× its recorded count per prompt token."""
    f = bench_host.measure_prefill(1024, requests=2, chunk=512, repeats=1)
    assert f.steps >= 4  # 2048 prompt tokens at 512 a step
    assert f.calls_per_token <= 1.1 * RECORDED_PREFILL, (
        f"{f.calls_per_token:.2f} calls per prompt token of chunked prefill, recorded {RECORDED_PREFILL}")


# Python calls per speculative step (k = 3, context 200, oracle drafts kept with probability `accept`) at batch 1 and 8:
# the scheduler's verification, acceptance, undo log and draft bookkeeping around the stand-in forward
# (bench/bench_host.py --spec; bench/RESULTS.md, "Speculative steps' host work"), the undo log's fixed-shape bodies
# counted as one replay each (engine/undo_graphs.py). Before that pass: 531 and 1401 at accept 0, 575 and 1527 at
# 0.8; before the undo graphs: 366, 949, 388, 1057.
RECORDED_SPEC = {(1, 0.0): 353, (8, 0.0): 933, (1, 0.8): 360, (8, 0.8): 1027}


@pytest.mark.parametrize("accept", [0.0, 0.8])
def test_calls_per_speculative_step(bench_host, accept):
    for batch in (1, 8):
        f = bench_host.measure_spec(batch, k=3, accept=accept, context=200, steps=3)
        assert (f.tokens_per_request_step == 1.0) if accept == 0.0 else (f.tokens_per_request_step > 2.0)
        recorded = RECORDED_SPEC[batch, accept]
        assert f.calls_per_step <= 1.1 * recorded, (
            f"{f.calls_per_step:.0f} calls per speculative step at batch {batch}, accept {accept}, recorded "
            f"{recorded}: more host work in a speculative step")
