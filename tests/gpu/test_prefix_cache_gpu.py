"""The prefix cache on the GPU (engine/prefix_cache.py): the bench preset (bf16, FP8 indexer cache, CUDA graphs
and overlap on), a request restored from a cached prefix against a cold prefill of the same prompt, for restored
positions at one and several pages with the rest of the prompt starting on and off compress-block boundaries.
Chunked prefill in bf16 rounds differently from one whole chunk, so log-probabilities are compared to bf16
rounding and the tokens where the reference's top two are apart by more than that."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from sparsepd.engine.engine import Engine
from sparsepd.engine.pools import PoolConfig
from sparsepd.engine.sampling import SamplingParams
from sparsepd.model.weights import build_model
from sparsepd.model_config import get_preset

sys.path.insert(0, str(Path(__file__).parent))
from prefix_cases_gpu import chunking_spread, close_to_cold, ids  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("SPARSEPD_TEST_GPU") != "1" or not torch.cuda.is_available(),
                                reason="needs a CUDA device and SPARSEPD_TEST_GPU=1")
CFG = get_preset("bench")
PAGE = CFG.page_size
PARAMS = SamplingParams(max_new_tokens=8, ignore_eos=True, logprobs=True, top_logprobs=2)


@pytest.fixture(scope="module")
def model():
    return build_model(CFG, seed=0, device="cuda")


def _engine(model, entries: int) -> Engine:
    return Engine(model, PoolConfig(num_slots=8, max_batch_tokens=1024, num_pages=256, prefix_cache_entries=entries),
                  cuda_graph=True, overlap=True)


def _ids(n: int, seed: int) -> list[int]:
    return ids(n, seed, CFG.vocab_size)


def _run(engine: Engine, prompt: list[int]):
    request = engine.submit(prompt, PARAMS)
    engine.scheduler.run_to_completion()
    return request


@pytest.mark.parametrize("first,extra", [(130, 70), (700, 1), (700, 260), (1500, 131)])
def test_a_hit_on_the_gpu_equals_a_cold_prefill(model, first, extra):
    a = _ids(first, seed=first)
    b = a + _ids(extra, seed=extra)
    warm = _engine(model, entries=8)
    _run(warm, a)
    got = _run(warm, b)
    want = _run(_engine(model, entries=0), b)
    assert got.cached_tokens == first // PAGE * PAGE > 0
    assert warm.is_idle_and_empty()
    close_to_cold(got, want)


@pytest.mark.parametrize("shared,budget", [(1000, 1024), (1000, 300), (300, 1024), (2100, 700)])
def test_a_shared_prefix_hits_on_the_gpu_and_equals_a_cold_prefill(model, shared, budget):
    """The radix tree (engine/prefix_cache.py): A and B share `shared` tokens and differ after; B restores the
    shared prefix rounded down to the page, whose snapshot A's prefill took inside a chunk (budget 1024) or
    after a chunk start off the page (budget 300, 700: the rows before the chunk copied in)."""
    prefix = _ids(shared, seed=shared)
    a, b = prefix + _ids(200, seed=1), prefix + _ids(150, seed=2)
    warm = Engine(model, PoolConfig(num_slots=8, max_batch_tokens=budget, num_pages=256, prefix_cache_entries=32),
                  cuda_graph=True, overlap=True)
    _run(warm, a)
    got = _run(warm, b)
    want = _run(_engine(model, entries=0), b)
    assert got.cached_tokens == shared // PAGE * PAGE > 0
    assert warm.is_idle_and_empty()
    # A's prefill computed the shared rows in A's chunks: the same prompt cold in one-page chunks, cut at the
    # restored boundary and in A's budget says how far chunking alone moves B's log-probabilities here
    spread = max(chunking_spread(want, _run(Engine(model, PoolConfig(num_slots=8, max_batch_tokens=tokens,
                                                                     num_pages=256), cuda_graph=True, overlap=True), b))
                 for tokens in (PAGE, shared // PAGE * PAGE, budget))
    close_to_cold(got, want, spread)


def test_a_host_tier_hit_on_the_gpu_equals_a_cold_prefill(model):
    """Two snapshot slots and a host tier (pinned memory): a 700-token prefill one page a forward leaves its first
    boundaries on the host; B sharing 300 tokens restores 256 from there (a host → device copy into its slot)."""
    from sparsepd.engine.pools import bytes_per_slot

    warm = Engine(model, PoolConfig(num_slots=8, max_batch_tokens=128, num_pages=256, prefix_cache_entries=2,
                                    prefix_cache_host_bytes=4 * bytes_per_slot(CFG)), cuda_graph=True, overlap=True)
    a = _ids(700, seed=7)
    b = a[:300] + _ids(100, seed=8)
    _run(warm, a)
    assert warm.prefix_cache.num_host_snapshots == 3
    got = _run(warm, b)
    want = _run(_engine(model, entries=0), b)
    assert got.cached_tokens == 256 and warm.prefix_cache.stats.host_hit_tokens == 256
    assert warm.is_idle_and_empty()
    close_to_cold(got, want)


def test_a_snapshot_taken_in_one_token_chunks_beside_decoding_requests_runs_eagerly(model):
    """A token budget of 2 beside a decoding request: every step is two one-token chunks, a graph's shape, but the
    step that reaches the boundary takes a snapshot (rows a graph does not write) and runs eagerly; a request
    restored from that snapshot equals a cold prefill."""
    warm = Engine(model, PoolConfig(num_slots=8, max_batch_tokens=2, num_pages=64, prefix_cache_entries=4),
                  cuda_graph=True, overlap=True)
    warm.capture_graphs(1024)
    background = warm.submit(_ids(5, seed=20), SamplingParams(max_new_tokens=200, ignore_eos=True))
    while background.num_computed < 5:
        warm.step()
    a = _ids(PAGE + 3, seed=21)
    first = warm.submit(a, PARAMS)
    warm.scheduler.run_to_completion()
    assert first.finish_reason == "length" and warm.prefix_cache.num_snapshots == 1
    b = a[:PAGE + 1] + _ids(40, seed=22)
    warm2_got = _run(warm, b)
    want = _run(_engine(model, entries=0), b)
    assert warm2_got.cached_tokens == PAGE
    assert warm.is_idle_and_empty()
    close_to_cold(warm2_got, want)
