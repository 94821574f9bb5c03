"""The scheduler's overlap (step N+1 launched before step N's tokens are read, its input token taken from the
device): the same tokens, logprobs and finishes as the plain loop, and pools back to full, including
requests that stop on a sampled stop token while the next step is already launched, and aborts."""

from __future__ import annotations

import pytest
import torch

from sparsepd.engine.engine import Engine
from sparsepd.engine.generate import generate
from sparsepd.engine.pools import PoolConfig
from sparsepd.engine.sampling import SamplingParams
from sparsepd.model.weights import build_model
from sparsepd.model_config import get_preset

LENGTHS = [1, 5, 16, 17, 33, 70]


@pytest.fixture(scope="module")
def model():
    return build_model(get_preset("tiny"), seed=0)


@pytest.fixture(scope="module")
def prompts():
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(0, 256, (n,), generator=gen).tolist() for n in LENGTHS]


def _engine(model, overlap: bool, **pool) -> Engine:
    return Engine(model, PoolConfig(**{"num_slots": 8, "max_batch_tokens": 40, "num_pages": 96, **pool}),
                  overlap=overlap)


def _run(engine: Engine, prompts, params) -> list:
    reqs = engine.generate(prompts, params)
    assert engine.is_idle_and_empty()
    return [(r.output_ids, r.finish_reason, r.output_logprobs) for r in reqs]


def test_overlap_gives_the_reference_greedy_tokens(model, prompts):
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    want = [generate(model, p, params).output_ids for p in prompts]
    got = _run(_engine(model, overlap=True), prompts, params)
    assert [g[0] for g in got] == want
    assert all(g[1] == "length" for g in got)


def test_overlap_equals_plain_loop_with_stops_sampling_and_logprobs(model, prompts):
    """Mixed params: a stop token the model produces early (the next step is already in flight when it is
    read), seeded sampling with filters, min_new_tokens, logprobs: identical outcomes either way."""
    plain_greedy = _run(_engine(model, overlap=False), prompts[:1], SamplingParams(max_new_tokens=6,
                                                                                   ignore_eos=True))
    stop = plain_greedy[0][0][2]  # the third greedy token of prompt 0
    params = [SamplingParams(max_new_tokens=12, stop_token_ids=(stop,), ignore_eos=True),
              SamplingParams(max_new_tokens=9, temperature=0.9, top_p=0.8, top_k=20, seed=7),
              SamplingParams(max_new_tokens=8, min_new_tokens=4, stop_token_ids=(stop,), ignore_eos=True,
                             logprobs=True, top_logprobs=2),
              SamplingParams(max_new_tokens=1, ignore_eos=True),
              SamplingParams(max_new_tokens=7, temperature=1.2, min_p=0.05, seed=11, logprobs=True),
              SamplingParams(max_new_tokens=11, ignore_eos=True)]
    plain = _run(_engine(model, overlap=False), prompts, params)
    overlapped = _run(_engine(model, overlap=True), prompts, params)
    assert plain[0][1] == "stop" and plain[0][0][-1] == stop and len(plain[0][0]) == 3
    assert [p[:2] for p in plain] == [o[:2] for o in overlapped]
    for p, o in zip(plain, overlapped, strict=True):
        assert len(p[2]) == len(o[2])
        for a, b in zip(p[2], o[2], strict=True):
            assert a.top_ids == b.top_ids and abs(a.logprob - b.logprob) < 1e-6


def test_overlap_abort_mid_run_frees_everything(model, prompts):
    engine = _engine(model, overlap=True)
    reqs = [engine.submit(p, SamplingParams(max_new_tokens=20, ignore_eos=True)) for p in prompts]
    for _ in range(5):
        engine.step()
    assert engine.abort(reqs[2].request_id) and engine.abort(reqs[0].request_id)
    engine.scheduler.run_to_completion()
    assert engine.is_idle_and_empty()
    assert reqs[2].finish_reason is None and len(reqs[2].output_ids) < 20
    assert all(len(r.output_ids) == 20 for i, r in enumerate(reqs) if i not in (0, 2))


def test_overlap_with_grammars_gives_the_same_tokens(model, prompts):
    """Grammar rows need step N's tokens before step N+1's masks (the step is reordered); plain rows beside
    them, a long prompt prefilled in chunks meanwhile: the same tokens and finishes either way."""
    from sparsepd.grammar import Grammar

    yes_no = Grammar(kind="ebnf", text='root ::= "yes" | "no" | "maybe " [0-9]')
    params = [SamplingParams(max_new_tokens=8, grammar=Grammar(kind="regex", text="[a-z]{2,4}-(x|y)")),
              SamplingParams(max_new_tokens=5, ignore_eos=True),
              SamplingParams(max_new_tokens=8, temperature=0.9, seed=3, grammar=yes_no),
              SamplingParams(max_new_tokens=6, ignore_eos=True, temperature=0.7, seed=4),
              SamplingParams(max_new_tokens=8, min_new_tokens=2, grammar=yes_no)]
    chosen = [prompts[0], prompts[1], prompts[2], prompts[5], prompts[3]]  # prompts[5]: 70 tokens, 2 chunks
    plain = _run(_engine(model, overlap=False), chosen, params)
    overlapped = _run(_engine(model, overlap=True), chosen, params)
    assert [p[:2] for p in plain] == [o[:2] for o in overlapped]
    assert [p[1] for p in plain] == ["stop", "length", "stop", "length", "stop"]
