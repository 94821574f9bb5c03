"""The host work of a decode step grows linearly in the batch: counted in Python calls per request-step
(bench/bench_host.py's stand-in forward, the real scheduler, pools, page growth, prefix cache and metadata
builder), not timed. A membership test on the running list (O(batch) per request) made it O(batch²): at
batch 128 that is ~64 extra calls per request-step against ~65 in all, so the ratio below would be ~1.8."""

import importlib.util
import sys
from pathlib import Path

import pytest

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
