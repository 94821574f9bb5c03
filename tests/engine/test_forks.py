"""n > 1 in the engine: one prefill, then each fork draws its first token from the same logits with its own
seed and runs on its own slot (a copy of the prompt's state). Every sequence equals an independent
single-process run with its own params; aborts before and after the fork free everything."""

from __future__ import annotations

import pytest
import torch

from sparsepd.engine.engine import Engine
from sparsepd.engine.generate import generate
from sparsepd.engine.pools import PoolConfig
from sparsepd.engine.sampling import SamplingParams
from sparsepd.model.weights import build_model
from sparsepd.model_config import get_preset


@pytest.fixture(scope="module")
def model():
    return build_model(get_preset("tiny"), seed=0)


def _prompt(n: int, seed: int = 5) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _engine(model, overlap: bool) -> Engine:
    return Engine(model, PoolConfig(num_slots=8, max_batch_tokens=24, num_pages=96), overlap=overlap)


@pytest.mark.parametrize("overlap", [False, True])
def test_each_fork_equals_an_independent_run_with_its_seed(model, overlap):
    prompt = _prompt(37)  # longer than the token budget: the prefill is chunked, the forks wait for its end
    params = [SamplingParams(max_new_tokens=9, temperature=1.0, top_k=50, seed=s, ignore_eos=True,
                             logprobs=True, top_logprobs=2) for s in (11, 12, 13)]
    engine = _engine(model, overlap)
    other = engine.submit(_prompt(5, seed=9), SamplingParams(max_new_tokens=12, ignore_eos=True))  # a batch-mate
    leader = engine.submit(prompt, params[0], forks=params[1:])
    forks = list(leader.forks)
    engine.scheduler.run_to_completion()
    assert engine.is_idle_and_empty()
    for request, p in zip([leader, *forks], params, strict=True):
        want = generate(model, prompt, p)
        assert request.output_ids == want.output_ids
        assert [x.logprob for x in request.output_logprobs] == pytest.approx([x.logprob for x in want.logprobs],
                                                                              rel=1e-5, abs=1e-6)
    assert len({tuple(r.output_ids) for r in [leader, *forks]}) > 1, "three seeds gave one sequence"
    assert other.output_ids == generate(model, _prompt(5, seed=9), other.params).output_ids


def test_greedy_forks_repeat_the_greedy_sequence(model):
    prompt, params = _prompt(20), SamplingParams(max_new_tokens=6, ignore_eos=True)
    engine = _engine(model, overlap=True)
    leader = engine.submit(prompt, params, forks=[params, params])
    forks = list(leader.forks)
    engine.scheduler.run_to_completion()
    want = generate(model, prompt, params).output_ids
    assert [r.output_ids for r in [leader, *forks]] == [want] * 3
    assert engine.is_idle_and_empty()


@pytest.mark.parametrize("victim", ["fork-before", "leader-before", "fork-after"])
def test_aborts_free_every_slot_and_page(model, victim):
    engine = _engine(model, overlap=True)
    params = SamplingParams(max_new_tokens=20, temperature=0.8, seed=3, ignore_eos=True)
    leader = engine.submit(_prompt(40), params, request_id="r", forks=[params.model_copy(update={"seed": 4})] * 2)
    fork_ids = [f.request_id for f in leader.forks]
    assert engine.pools.slots.num_used == 0  # reserved at admission, with the leader
    engine.step()
    assert engine.pools.slots.num_used == 3
    if victim == "fork-before":
        assert engine.abort(fork_ids[0]) and len(leader.forks) == 1
    elif victim == "leader-before":
        assert engine.abort("r") and engine.pools.slots.num_used == 0
    else:
        while leader.forks:
            engine.step()
        assert engine.abort(fork_ids[1])
    engine.scheduler.run_to_completion()
    assert engine.is_idle_and_empty()
