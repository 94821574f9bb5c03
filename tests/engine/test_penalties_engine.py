"""Greedy generation with penalties and a logit bias through the engine (overlap on and off, penalized rows
beside plain ones, a state exported and imported mid-request) equals the single-process reference loop, which
applies the same penalties to the reference model's logits on the host (engine/generate.py)."""

from __future__ import annotations

import pytest

from sparsepd.engine.engine import Engine
from sparsepd.engine.generate import generate
from sparsepd.engine.pools import PoolConfig
from sparsepd.engine.sampling import SamplingParams
from sparsepd.engine.state_io import export_state, import_state
from sparsepd.model.weights import build_model
from sparsepd.model_config import get_preset

PROMPTS = [[12, 216, 5, 6, 7, 8, 9, 10], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4]]
PARAMS = [SamplingParams(max_new_tokens=12, ignore_eos=True, frequency_penalty=1.5),
          SamplingParams(max_new_tokens=12, ignore_eos=True, repetition_penalty=1.5),
          SamplingParams(max_new_tokens=12, ignore_eos=True, logit_bias=((42, 3.0),), presence_penalty=0.5,
                         frequency_penalty=0.7),
          SamplingParams(max_new_tokens=12, ignore_eos=True, repetition_penalty=0.5, logit_bias=((7, -100.0),)),
          SamplingParams(max_new_tokens=12, ignore_eos=True)]  # plain, in the same batches


@pytest.fixture(scope="module")
def model():
    return build_model(get_preset("tiny"), seed=0)


@pytest.fixture(scope="module")
def reference(model):
    cases = [(PROMPTS[i % 2], p) for i, p in enumerate(PARAMS)]
    return cases, [generate(model, prompt, p).output_ids for prompt, p in cases]


def _engine(model, overlap: bool = False) -> Engine:
    return Engine(model, PoolConfig(num_slots=4, max_batch_tokens=24, num_pages=40), overlap=overlap)


def test_the_reference_penalties_change_greedy_output(model, reference):
    cases, want = reference
    plain = {tuple(prompt): out for (prompt, p), out in zip(cases, want, strict=True) if not p.penalized}
    plain[tuple(PROMPTS[1])] = generate(model, PROMPTS[1], PARAMS[-1]).output_ids
    for (prompt, p), out in zip(cases[:4], want[:4], strict=True):
        assert out != plain[tuple(prompt)], p


@pytest.mark.parametrize("overlap", [False, True])
def test_engine_penalties_equal_the_reference(model, reference, overlap):
    """Five requests in four slots: slots are reused, so one slot's history is rebuilt for a newcomer."""
    cases, want = reference
    engine = _engine(model, overlap)
    got = engine.generate([prompt for prompt, _ in cases], [p for _, p in cases])
    assert [r.output_ids for r in got] == want
    assert engine.is_idle_and_empty()


def test_export_import_keeps_the_penalty_history(model, reference):
    """The decode side holds placeholder prompt ids: the repetition penalty's prompt ids travel in the state."""
    cases, want = reference
    for case in (1, 3):
        prompt, params = cases[case]
        source, target = _engine(model), _engine(model)
        request = source.submit(prompt, params)
        while not request.output_ids:
            source.step()
        descriptor, tensors = export_state(source.pools, request)
        moved = target.make_request([0] * len(prompt), params)
        target.scheduler.reserve(moved)
        import_state(target.pools, moved, descriptor, tensors)
        target.scheduler.activate(moved)
        source.abort(request.request_id)
        target.scheduler.run_to_completion()
        assert moved.output_ids == want[case]
        assert source.is_idle_and_empty() and target.is_idle_and_empty()
