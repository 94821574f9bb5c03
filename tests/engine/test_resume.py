"""A request resumed from the tokens it already generated (what the router does when a worker is lost:
`Engine.make_request(..., output_ids=...)`) continues exactly as the undisturbed run: greedy, seeded sampling
with penalties and a bias, min_new_tokens with stop ids, a stop on EOS; its prefill of prompt + output
chunked under a small token budget; beside other requests; overlap on and off."""

from __future__ import annotations

import pytest

from sparsepd.engine.engine import Engine
from sparsepd.engine.pools import PoolConfig
from sparsepd.engine.sampling import SamplingParams
from sparsepd.model.weights import build_model
from sparsepd.model_config import get_preset

PROMPTS = [[256, 12, 216, 5, 6, 7, 8, 9, 10], [256, *range(40, 77)]]
PARAMS = [
    SamplingParams(max_new_tokens=12, ignore_eos=True),
    SamplingParams(max_new_tokens=12, temperature=0.9, top_p=0.9, seed=7, ignore_eos=True),
    SamplingParams(max_new_tokens=12, temperature=1.2, top_k=40, seed=11, frequency_penalty=0.8,
                   presence_penalty=0.4, repetition_penalty=1.3, logit_bias=((65, 2.0),), ignore_eos=True),
    SamplingParams(max_new_tokens=12, temperature=1.0, seed=3, min_new_tokens=8, stop_token_ids=(70, 71, 72)),
]


@pytest.fixture(scope="module")
def model():
    return build_model(get_preset("tiny"), seed=0)


def _engine(model, overlap: bool) -> Engine:
    return Engine(model, PoolConfig(num_slots=4, max_batch_tokens=24, num_pages=40), overlap=overlap)


@pytest.fixture(scope="module")
def undisturbed(model):
    engine = _engine(model, overlap=False)
    cases = [(PROMPTS[i % 2], p) for i, p in enumerate(PARAMS)]
    runs = engine.generate([prompt for prompt, _ in cases], [p for _, p in cases])
    return cases, [(r.output_ids, r.finish_reason) for r in runs]


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("done", [1, 9])
def test_resumed_requests_continue_as_if_undisturbed(model, undisturbed, overlap, done):
    cases, want = undisturbed
    engine = _engine(model, overlap)
    requests = []
    for i, ((prompt, params), (out, _)) in enumerate(zip(cases, want, strict=True)):
        k = min(done, len(out) - 1)  # a request moved after k of its tokens (at least one left to draw)
        request = engine.make_request(prompt, params, f"r{i}", output_ids=out[:k])
        assert request.prefilling and request.sampler.num_drawn == k
        engine.scheduler.add(request)
        requests.append(request)
    engine.scheduler.run_to_completion()
    assert [(r.output_ids, r.finish_reason) for r in requests] == want
    assert engine.is_idle_and_empty()


def test_nothing_left_to_generate_is_refused(model):
    engine = _engine(model, overlap=False)
    with pytest.raises(ValueError, match="nothing left to generate"):
        engine.make_request([256, 1], SamplingParams(max_new_tokens=3), output_ids=[1, 2, 3])
    with pytest.raises(ValueError, match="must lie in"):
        engine.make_request([256, 1], SamplingParams(max_new_tokens=3), output_ids=[999])
