"""Pages on demand (engine/scheduler.py): a request is admitted with the pages of its prompt and next token and
gets one more at each page boundary; when none is free, the newest decoding requests are retracted (state to
host memory, slot and pages freed) and resumed later with the single-process reference's tokens, greedy,
seeded or penalized; aborting a retracted request frees everything; a request without a token limit holds
only the pages it uses; past the bound on the host memory retracted states take, the newest decoding request
fails instead of being retracted."""

from __future__ import annotations

import pytest
import torch

from sparsepd.engine.engine import Engine
from sparsepd.engine.generate import generate
from sparsepd.engine.pools import PoolConfig
from sparsepd.engine.sampling import SamplingParams
from sparsepd.engine.state_io import export_state, state_num_bytes
from sparsepd.model.weights import build_model
from sparsepd.model_config import get_preset

CFG = get_preset("tiny")
PAGE = CFG.page_size


@pytest.fixture(scope="module")
def model():
    return build_model(CFG, seed=0)


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _engine(model, num_pages: int, overlap: bool = False, slots: int = 8) -> Engine:
    return Engine(model, PoolConfig(num_slots=slots, max_batch_tokens=64, num_pages=num_pages), overlap=overlap)


def test_pages_grow_one_at_a_time_at_page_boundaries(model):
    engine = _engine(model, num_pages=32)
    request = engine.submit(_ids(10, seed=1), SamplingParams(max_new_tokens=50, ignore_eos=True))
    seen = []
    while engine.scheduler.has_work:
        engine.step()
        if request.slot is not None:
            seen.append((request.num_computed, len(request.pages)))
            if not request.prefilling:  # what its KV fills, and at most the next token's page (taken at a step's start)
                n, pages_for = request.num_computed, engine.pools.pages_for
                assert pages_for(n) <= len(request.pages) <= pages_for(n + 1), seen
    assert [p for _, p in seen] == sorted(p for _, p in seen) and seen[-1][1] - seen[0][1] >= 2
    assert all(b - a <= 1 for (_, a), (_, b) in zip(seen, seen[1:], strict=False))
    assert engine.is_idle_and_empty()


def test_a_request_without_a_limit_holds_only_what_it_uses(model):
    engine = _engine(model, num_pages=96)
    prompt = _ids(20, seed=2)
    request = engine.submit(prompt, SamplingParams(max_new_tokens=CFG.max_seq_len - len(prompt), ignore_eos=True))
    for _ in range(30):
        engine.step()
    assert len(request.output_ids) >= 25
    assert len(request.pages) <= engine.pools.pages_for(request.num_computed + 1) <= 4  # not 64
    assert engine.abort(request.request_id) and engine.is_idle_and_empty()


PARAMS = [SamplingParams(max_new_tokens=40, ignore_eos=True),
          SamplingParams(max_new_tokens=36, ignore_eos=True, temperature=0.9, top_k=40, seed=7),
          SamplingParams(max_new_tokens=44, ignore_eos=True, temperature=0.8, seed=11, frequency_penalty=0.5,
                         repetition_penalty=1.2),
          SamplingParams(max_new_tokens=30, ignore_eos=True),
          SamplingParams(max_new_tokens=38, ignore_eos=True, temperature=1.0, seed=3, logprobs=True, top_logprobs=2)]


def _run_all(engine: Engine, prompts):
    requests = [engine.submit(p, sp, f"r{i}") for i, (p, sp) in enumerate(zip(prompts, PARAMS, strict=True))]
    engine.scheduler.run_to_completion()
    return requests


PROMPTS = [_ids(n, seed=10 + n) for n in (9, 21, 14, 30, 5)]


@pytest.fixture(scope="module")
def references(model):
    """Each request alone through the single-process reference (engine/generate.py)."""
    return [generate(model, p, sp) for p, sp in zip(PROMPTS, PARAMS, strict=True)]


@pytest.mark.parametrize("overlap", [False, True])
def test_a_pool_too_small_for_all_retracts_and_every_request_finishes_with_its_tokens(model, references, overlap):
    small = _engine(model, num_pages=12, overlap=overlap)  # 192 tokens for five requests that grow to 49-60
    got = _run_all(small, PROMPTS)
    assert small.scheduler.retractions > 0
    for g, w in zip(got, references, strict=True):
        assert g.finish_reason == w.finish_reason == "length" and not g.error
        assert g.output_ids == w.output_ids, g.request_id
    assert len(got[4].output_logprobs) == len(references[4].logprobs) == PARAMS[4].max_new_tokens
    for g, w in zip(got[4].output_logprobs, references[4].logprobs, strict=True):
        assert g.top_ids == w.top_ids and g.logprob == pytest.approx(w.logprob, rel=1e-5, abs=1e-6)
    assert small.is_idle_and_empty()


def test_aborting_a_retracted_request_frees_everything(model):
    engine = _engine(model, num_pages=8)
    requests = [engine.submit(_ids(12, seed=s), SamplingParams(max_new_tokens=60, ignore_eos=True), f"r{s}")
                for s in range(3)]
    while not engine.scheduler.retractions:
        assert engine.scheduler.has_work
        engine.step()
    retracted = next(r for r in requests if r.offloaded is not None)
    assert retracted.slot is None and not retracted.pages and retracted in engine.scheduler.waiting
    assert engine.abort(retracted.request_id)
    for r in requests:
        engine.abort(r.request_id)
    assert engine.is_idle_and_empty()


def test_a_request_the_pool_holds_alone_finishes_and_one_it_never_can_is_refused(model):
    engine = _engine(model, num_pages=4)  # 64 tokens: 30 + 33 fit, 30 + 40 never will
    lone = engine.submit(_ids(30, seed=1), SamplingParams(max_new_tokens=33, ignore_eos=True), "lone")
    engine.scheduler.run_to_completion()
    assert lone.finish_reason == "length" and engine.is_idle_and_empty()
    with pytest.raises(Exception, match="pages"):  # declared tokens the pool can never hold: refused at once
        engine.submit(_ids(30, seed=2), SamplingParams(max_new_tokens=40, ignore_eos=True))


def test_the_bytes_a_retraction_would_take_are_those_it_takes(model):
    engine = _engine(model, num_pages=32)
    request = engine.submit(_ids(37, seed=4), SamplingParams(max_new_tokens=20, ignore_eos=True))
    while len(request.output_ids) < 5:
        engine.step()
    _, tensors = export_state(engine.pools, request)
    assert state_num_bytes(engine.pools, request) == sum(t.nbytes for t in tensors.values()) > 0
    assert engine.abort(request.request_id) and engine.is_idle_and_empty()


def _offloaded_bytes(engine: Engine) -> int:
    return sum(t.nbytes for r in engine.scheduler.waiting if r.offloaded is not None for t in r.offloaded.values())


def test_past_the_host_memory_bound_the_newest_request_fails_instead_of_being_retracted(model):
    """With host memory for one retracted state, a pool too small for three requests retracts one, then fails
    the newest decoding request (finish "error", overloaded, naming the bound) while that one waits; the host
    memory retracted states take never passes the bound; the other requests' tokens are the reference's."""
    probe = _engine(model, num_pages=64)
    one = probe.submit(_ids(30, seed=1), SamplingParams(max_new_tokens=2, ignore_eos=True))
    probe.step()  # 30 tokens computed: as large as a state of the requests below gets before it is retracted
    bound = state_num_bytes(probe.pools, one)
    small = Engine(model, PoolConfig(num_slots=8, max_batch_tokens=64, num_pages=4), max_retracted_bytes=bound)
    prompts, params = [_ids(n, seed=10 + n) for n in (9, 14, 5)], [p.model_copy(update={"max_new_tokens": 24})
                                                                  for p in PARAMS[:3]]
    requests = [small.submit(p, sp, f"r{i}") for i, (p, sp) in enumerate(zip(prompts, params, strict=True))]
    outputs = []
    while small.scheduler.has_work:
        outputs += small.step()
        assert _offloaded_bytes(small) <= bound
    failed = [r for r in requests if r.finish_reason == "error"]
    assert len(failed) == 1 and "over the bound of" in failed[0].error and "--max-retracted-memory" in failed[0].error
    assert [o.request_id for o in outputs if o.finish_reason == "error" and o.overloaded] == [failed[0].request_id]
    assert small.scheduler.retractions == 1
    for r, p, sp in zip(requests, prompts, params, strict=True):
        if r is not failed[0]:
            want = generate(model, p, sp)
            assert (r.finish_reason, r.output_ids) == (want.finish_reason, want.output_ids), r.request_id
    assert small.is_idle_and_empty()
