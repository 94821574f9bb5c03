"""The serving features on the GPU path (CUDA graphs and overlap on, as a decode worker runs them): n > 1 forks,
penalties with a logit bias, each against the single-process reference on the same device (tiny, fp32)."""

from __future__ import annotations

import os

import pytest
import torch

from sparsepd.engine.engine import Engine
from sparsepd.engine.generate import generate
from sparsepd.engine.pools import PoolConfig
from sparsepd.engine.sampling import SamplingParams
from sparsepd.model.weights import build_model
from sparsepd.model_config import get_preset

pytestmark = pytest.mark.skipif(os.environ.get("SPARSEPD_TEST_GPU") != "1" or not torch.cuda.is_available(),
                                reason="needs a CUDA device and SPARSEPD_TEST_GPU=1")


@pytest.fixture(scope="module")
def model():
    return build_model(get_preset("tiny", quantize_kv=False, index_topk=256), seed=0, device="cuda")


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _engine(model) -> Engine:
    return Engine(model, PoolConfig(num_slots=8, max_batch_tokens=64, num_pages=128), cuda_graph=True, overlap=True)


def test_forks_on_the_graph_path_equal_independent_runs(model):
    prompt = _prompt(90, seed=1)
    params = [SamplingParams(max_new_tokens=24, temperature=1.0, top_k=50, seed=s, ignore_eos=True) for s in (5, 6, 7)]
    engine = _engine(model)
    mate = engine.submit(_prompt(7, seed=2), SamplingParams(max_new_tokens=30, ignore_eos=True))
    leader = engine.submit(prompt, params[0], forks=params[1:])
    forks = list(leader.forks)
    engine.scheduler.run_to_completion()
    assert [r.output_ids for r in [leader, *forks]] == [generate(model, prompt, p).output_ids for p in params]
    assert mate.output_ids == generate(model, _prompt(7, seed=2), mate.params).output_ids
    assert engine.is_idle_and_empty()


def test_penalties_and_bias_on_the_graph_path_equal_the_reference(model):
    prompts = [_prompt(n, seed=n) for n in (3, 40, 77)]
    params = [SamplingParams(max_new_tokens=20, ignore_eos=True, frequency_penalty=1.2),
              SamplingParams(max_new_tokens=20, ignore_eos=True, repetition_penalty=1.6, logit_bias=((9, 2.5),)),
              SamplingParams(max_new_tokens=20, temperature=0.8, seed=3, ignore_eos=True, presence_penalty=0.7)]
    engine = _engine(model)
    got = engine.generate(prompts, params)
    want = [generate(model, p, sp).output_ids for p, sp in zip(prompts, params, strict=True)]
    assert [r.output_ids for r in got] == want
    assert engine.is_idle_and_empty()
