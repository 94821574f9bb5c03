"""The prefix cache's host tier on the GPU (engine/prefix_cache.py): on the bench preset with CUDA graphs and
overlap, tree pages evicted under page pressure go to pinned host memory (stream-ordered copies) and come back
into fresh device pages on a hit; the restored request equals a cold prefill (tokens where the reference's top two
are apart, log-probabilities to bf16 rounding), and nothing leaks."""

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
from prefix_cases_gpu import close_to_cold, ids  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("SPARSEPD_TEST_GPU") != "1" or not torch.cuda.is_available(),
                                reason="needs a CUDA device and SPARSEPD_TEST_GPU=1")
CFG = get_preset("bench")
PAGE = CFG.page_size
PARAMS = SamplingParams(max_new_tokens=8, ignore_eos=True, logprobs=True, top_logprobs=2)


@pytest.fixture(scope="module")
def model():
    return build_model(CFG, seed=0, device="cuda")


def _ids(n: int, seed: int) -> list[int]:
    return ids(n, seed, CFG.vocab_size)


def _run(engine: Engine, prompt: list[int]):
    request = engine.submit(prompt, PARAMS)
    engine.scheduler.run_to_completion()
    assert request.finish_reason == "length"
    return request


def test_host_tier_pages_come_back_on_the_gpu_equal_to_a_cold_prefill(model):
    warm = Engine(model, PoolConfig(num_slots=4, max_batch_tokens=1024, num_pages=12, prefix_cache_entries=4,
                                    prefix_cache_host_bytes=200_000_000), cuda_graph=True, overlap=True)
    cache = warm.prefix_cache
    a = _ids(800, seed=1)
    _run(warm, a)
    for seed in (2, 3):  # 7 pages each in a pool of 12: a's deeper pages and snapshots move to the host
        _run(warm, _ids(800, seed=seed))
    assert cache.num_host_pages > 0
    b = a[:700] + _ids(50, seed=4)
    got = _run(warm, b)
    assert got.cached_tokens == 640 and cache.stats.host_page_restores > 0 and cache.stats.host_hit_tokens == 640
    cold = Engine(model, PoolConfig(num_slots=4, max_batch_tokens=1024, num_pages=64), cuda_graph=True, overlap=True)
    want = _run(cold, b)
    assert warm.is_idle_and_empty()
    warm.prefix_cache.clear()
    assert warm.pools.pages.num_used == 0 and warm.host_memory.cached == 0
    close_to_cold(got, want)
