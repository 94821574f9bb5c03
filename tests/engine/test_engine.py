"""The engine reproduces the reference model: greedy tokens of concurrent, chunked, moved requests equal
those of the single-process reference run one request at a time; pools always return to full."""

from __future__ import annotations

import pytest
import torch

from sparsepd.engine.engine import Engine
from sparsepd.engine.generate import generate
from sparsepd.engine.pools import OutOfCapacity, PoolConfig
from sparsepd.engine.sampling import SamplingParams
from sparsepd.engine.state_io import export_state, import_state, shipped_bytes
from sparsepd.model.weights import build_model
from sparsepd.model_config import get_preset

# Prompt lengths before, on and after the tiny preset's boundaries (ratio 4, HCA ratio 16, window 16).
LENGTHS = [1, 4, 5, 15, 16, 17, 33, 64, 70]
GREEDY = SamplingParams(max_new_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def model():
    return build_model(get_preset("tiny"), seed=0)


@pytest.fixture(scope="module")
def reference(model):
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in LENGTHS]
    return prompts, [generate(model, p, GREEDY).output_ids for p in prompts]


def _engine(model, **pool) -> Engine:
    return Engine(model, PoolConfig(**{"num_slots": 16, "max_batch_tokens": 96, "num_pages": 96, **pool}))


def test_concurrent_batch_equals_reference(model, reference):
    prompts, want = reference
    engine = _engine(model)
    got = engine.generate(prompts, GREEDY)
    assert [r.output_ids for r in got] == want
    assert all(r.finish_reason == "length" for r in got)
    assert engine.is_idle_and_empty()


def test_batch_composition_does_not_change_tokens(model, reference):
    prompts, want = reference
    engine = _engine(model)
    alone = engine.generate([prompts[6]], GREEDY)[0].output_ids
    mixed = engine.generate([prompts[0], prompts[6], prompts[3]], GREEDY)
    assert alone == mixed[1].output_ids == want[6]
    assert engine.is_idle_and_empty()


@pytest.mark.parametrize("budget", [7, 16, 33])
def test_chunked_prefill_budgets_give_the_same_tokens(model, reference, budget):
    prompts, want = reference
    engine = _engine(model, max_batch_tokens=budget)
    got = engine.generate(prompts[4:], GREEDY)
    assert [r.output_ids for r in got] == want[4:]
    assert engine.is_idle_and_empty()


def test_export_import_continues_identically(model, reference):
    prompts, want = reference
    source, target = _engine(model), _engine(model, num_pages=40)
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    request = source.submit(prompts[7], params)
    while not request.output_ids:  # prefill, first token sampled
        source.step()
    descriptor, tensors = export_state(source.pools, request)
    cfg = model.cfg
    assert descriptor.num_bytes == shipped_bytes(cfg, descriptor.position)
    moved = target.make_request(prompts[7], params)
    target.scheduler.admit(moved)
    import_state(target.pools, moved, descriptor, tensors)
    source.abort(request.request_id)
    target.scheduler.run_to_completion()
    assert moved.output_ids == want[7]
    assert source.is_idle_and_empty() and target.is_idle_and_empty()


def test_admission_waits_for_pages_and_refuses_the_impossible(model, reference):
    prompts, want = reference
    engine = _engine(model, num_pages=6, num_slots=4)  # 6 pages = 96 tokens: one 82-token request at a time
    big = [prompts[8], prompts[7]]  # 70 + 12 and 64 + 12 tokens: 6 and 5 pages
    got = engine.generate(big, GREEDY)
    assert [r.output_ids for r in got] == [want[8], want[7]]
    assert engine.is_idle_and_empty()
    with pytest.raises(OutOfCapacity, match="pages"):
        engine.submit(list(range(100)), GREEDY)
    assert engine.is_idle_and_empty()


def test_abort_frees_everything(model, reference):
    prompts, _ = reference
    engine = _engine(model)
    reqs = [engine.submit(p, GREEDY) for p in prompts]
    engine.step()
    engine.step()
    for r in reqs:
        engine.abort(r.request_id)
    assert not engine.abort("no-such-request")
    assert engine.is_idle_and_empty()


def test_min_new_tokens_masks_eos_and_stop_tokens(model, reference):
    prompts, want = reference
    stop = want[5][1]  # greedy's second token: without the mask the request would stop there
    params = SamplingParams(max_new_tokens=12, min_new_tokens=6, stop_token_ids=(stop,), ignore_eos=True)
    ref = generate(model, prompts[5], params)
    assert stop not in ref.output_ids[:6]
    assert ref.output_ids[:2] != want[5][:2]  # the mask changed the path
    engine = _engine(model)
    got = engine.generate([prompts[5], prompts[2]], [params, GREEDY])
    assert got[0].output_ids == ref.output_ids and got[1].output_ids == want[2]
    assert engine.is_idle_and_empty()


def test_logprobs_equal_the_reference(model, reference):
    prompts, want = reference
    params = SamplingParams(max_new_tokens=12, ignore_eos=True, logprobs=True, top_logprobs=3)
    ref = generate(model, prompts[7], params)
    assert ref.output_ids == want[7] and len(ref.logprobs) == 12
    engine = _engine(model, max_batch_tokens=16)
    got = engine.generate([prompts[7], prompts[1]], [params, GREEDY])
    assert got[0].output_ids == want[7] and got[1].output_logprobs == []
    for a, b, token in zip(got[0].output_logprobs, ref.logprobs, want[7], strict=True):
        assert a.top_ids == b.top_ids and a.top_ids[0] == token  # greedy: the best is the chosen one
        assert abs(a.logprob - b.logprob) < 1e-5 and a.logprob == a.top_logprobs[0]
        assert max(abs(x - y) for x, y in zip(a.top_logprobs, b.top_logprobs, strict=True)) < 1e-5
