"""Speculative decoding (engine/speculative.py) is exact: on the CPU in fp32 the tokens, finish reasons and
log-probabilities with k drafts per step equal those without, for the trained default model's MTP drafts and for
oracle drafts of a set acceptance on the random tiny preset; rejected positions leave no trace in the state; the
pools return to full."""

from __future__ import annotations

import pytest
import torch

from sparsepd.default_model import DEFAULT_CHECKPOINT
from sparsepd.engine.drafter import OracleDrafter
from sparsepd.engine.engine import Engine
from sparsepd.engine.pools import PoolConfig
from sparsepd.engine.sampling import SamplingParams
from sparsepd.engine.state_io import export_state
from sparsepd.load_options import LoadOptions, resolve_model_config
from sparsepd.model.mtp import load_mtp
from sparsepd.model.weight_memory import gb
from sparsepd.model.weights import build_model
from sparsepd.model_config import get_preset

LENGTHS = [1, 5, 16, 17, 33, 70]  # around the tiny preset's boundaries (ratio 4, HCA 16, window 16, page 16)
GREEDY = SamplingParams(max_new_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny():
    return build_model(get_preset("tiny"), seed=0)


@pytest.fixture(scope="module")
def trained():
    cfg = resolve_model_config("tiny", str(DEFAULT_CHECKPOINT), LoadOptions())
    return build_model(cfg, checkpoint=str(DEFAULT_CHECKPOINT)), load_mtp(cfg, DEFAULT_CHECKPOINT)


def _prompts(seed: int = 3) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=gen).tolist() for n in LENGTHS]


def _text_prompts() -> list[list[int]]:
    text = (DEFAULT_CHECKPOINT / "heldout_sample.txt").read_bytes()
    return [list(text[i * 97: i * 97 + n]) for i, n in enumerate(LENGTHS)]


def _pool(**kw) -> PoolConfig:
    return PoolConfig(**{"num_slots": 8, "max_batch_tokens": 40, "num_pages": 96, **kw})


def _run(model, prompts, params, k=0, drafter=None, mtp=None, **pool):
    engine = Engine(model, _pool(**pool), speculative_num_steps=k, drafter=drafter, mtp=mtp)
    requests = engine.generate(prompts, params)
    assert engine.is_idle_and_empty()
    return engine, requests


def _same(got, want):
    assert [r.output_ids for r in got] == [r.output_ids for r in want]
    assert [r.finish_reason for r in got] == [r.finish_reason for r in want]
    assert [r.output_logprobs for r in got] == [r.output_logprobs for r in want]


@pytest.mark.parametrize("k", [1, 2, 3])
def test_trained_model_mtp_drafts_give_the_same_tokens(trained, k):
    """A mixed batch of chunked prompts (budget 40 < the longest prompt): the same greedy tokens and
    log-probabilities, and some drafts of the trained MTP layer are accepted."""
    model, mtp = trained
    params = SamplingParams(max_new_tokens=24, ignore_eos=True, logprobs=True, top_logprobs=2)
    _, want = _run(model, _text_prompts(), params)
    engine, got = _run(model, _text_prompts(), params, k=k, mtp=mtp)
    _same(got, want)
    stats = engine.scheduler.stats
    assert stats.drafted > 0 and 0 < stats.accepted <= stats.drafted
    assert sum(stats.accept_lengths) == stats.verifications and len(stats.accept_lengths) == k + 1


def _references(model, prompts, params):
    _, want = _run(model, prompts, params)
    return want, {f"req-{i}": r.output_ids for i, r in enumerate(want)}


@pytest.mark.parametrize("k,accept", [(1, 1.0), (3, 1.0), (3, 0.5), (2, 0.0)])
def test_oracle_drafts_on_tiny_give_the_same_tokens(tiny, k, accept):
    want, refs = _references(tiny, _prompts(), GREEDY)
    drafter = OracleDrafter(refs, accept, tiny.cfg.vocab_size, seed=1)
    engine, got = _run(tiny, _prompts(), GREEDY, k=k, drafter=drafter)
    _same(got, want)
    stats = engine.scheduler.stats
    if accept == 1.0:
        assert stats.accepted == stats.drafted > 0 and stats.accept_lengths[k] > 0
    elif accept == 0.0:
        assert stats.accepted == 0 < stats.drafted
    else:
        assert 0 < stats.accepted < stats.drafted


def test_stop_inside_an_accepted_run(tiny):
    """A stop token and max_new_tokens that fall inside runs of accepted drafts end the request there."""
    prompts = _prompts()
    _, plain = _run(tiny, prompts, GREEDY)
    stops = [SamplingParams(max_new_tokens=24, stop_token_ids=(r.output_ids[9],)) for r in plain]
    stops[0] = SamplingParams(max_new_tokens=11, ignore_eos=True)
    want, refs = _references(tiny, prompts, stops)
    assert all(r.finish_reason == "stop" for r in want[1:]) and want[0].finish_reason == "length"
    engine, got = _run(tiny, prompts, stops, k=3, drafter=OracleDrafter(refs, 1.0, tiny.cfg.vocab_size))
    _same(got, want)
    assert engine.scheduler.stats.accepted == engine.scheduler.stats.drafted > 0


def test_mixed_batch_with_penalties_min_tokens_and_logprobs(tiny):
    """Requests that cannot draft (penalties) decode beside drafting ones; min_new_tokens bans eos on the
    drafted rows as it does one token at a time."""
    eos = tiny.cfg.eos_id
    params = [SamplingParams(max_new_tokens=20, frequency_penalty=0.5, repetition_penalty=1.2),
              SamplingParams(max_new_tokens=20, min_new_tokens=15, logit_bias=((eos, 30.0),)),
              SamplingParams(max_new_tokens=20, logprobs=True, top_logprobs=3, token_ids_logprob=(1, 2)),
              SamplingParams(max_new_tokens=20, ignore_eos=True), GREEDY, GREEDY]
    prompts = _prompts()
    want, refs = _references(tiny, prompts, params)
    assert want[1].finish_reason == "stop" and len(want[1].output_ids) == 16  # eos wins once allowed (token 16)
    engine, got = _run(tiny, prompts, params, k=3, drafter=OracleDrafter(refs, 0.7, tiny.cfg.vocab_size, seed=2))
    _same(got, want)
    assert engine.scheduler.stats.accepted > 0


def _step_until(engine, requests, done):
    while not done():
        engine.step()


@pytest.mark.parametrize("finish", ["length", "stop"])
def test_rejected_positions_leave_no_trace_in_the_state(tiny, finish):
    """The exported state (SWA rings, compressor rings, committed compressed and indexer rows of every page it
    holds) after decoding with drafts rejected equals, bit for bit, the one without speculation: with half the
    drafts rejected and the request running to its length, and with every draft accepted by the model but the
    request stopping inside the run (the positions past the stop are taken back)."""
    prompts = _prompts()[2:6]
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    if finish == "stop":
        _, plain = _run(tiny, prompts, params)
        params = [SamplingParams(max_new_tokens=40, stop_token_ids=(r.output_ids[9 + i],))
                  for i, r in enumerate(plain)]
    _, refs = _references(tiny, prompts, params)

    def states(k, drafter=None):
        engine = Engine(tiny, _pool(), speculative_num_steps=k, drafter=drafter)
        requests = [engine.submit(p, q) for p, q in zip(prompts, params if isinstance(params, list)
                                                            else [params] * len(prompts), strict=True)]
        for r in requests:
            r.keep_on_finish = True
        engine.scheduler.run_to_completion()
        assert all(r.finish_reason == finish for r in requests)
        out = [export_state(engine.pools, r) for r in requests]
        for r in requests:
            engine.release(r)
        assert engine.is_idle_and_empty()
        return [(d.position, d.output_ids, t) for d, t in out]

    want = states(0)
    drafter = OracleDrafter(refs, 0.5 if finish == "length" else 1.0, tiny.cfg.vocab_size, seed=5)
    got = states(3, drafter)
    for (p_want, out_want, a), (p_got, out_got, b) in zip(want, got, strict=True):
        assert (p_want, out_want) == (p_got, out_got) and a.keys() == b.keys()
        bad = [name for name in a if not torch.equal(a[name], b[name])]
        assert not bad, f"state tensors differ after speculation: {bad}"


def test_abort_between_verifications(tiny):
    """Aborting a request that holds drafts frees it; the others' tokens are unchanged; pools back to full."""
    prompts = _prompts()
    want, refs = _references(tiny, prompts, GREEDY)
    engine = Engine(tiny, _pool(), speculative_num_steps=3, drafter=OracleDrafter(refs, 0.8, 260, seed=3))
    requests = [engine.submit(p, GREEDY) for p in prompts]
    _step_until(engine, requests, lambda: len(requests[2].output_ids) >= 5 and requests[2].draft_ids)
    assert engine.abort(requests[2].request_id)
    engine.scheduler.run_to_completion()
    assert requests[2].slot is None and len(requests[2].output_ids) < GREEDY.max_new_tokens
    assert [r.output_ids for i, r in enumerate(requests) if i != 2] == [r.output_ids for i, r in enumerate(want)
                                                                       if i != 2]
    assert engine.is_idle_and_empty()


def test_seeded_sampled_rows_are_reproducible_and_equal_without_speculation(trained):
    model, mtp = trained
    params = [SamplingParams(max_new_tokens=24, temperature=t, top_k=k, top_p=p, seed=11 + i, ignore_eos=True)
              for i, (t, k, p) in enumerate([(0.7, -1, 1.0), (1.0, 5, 1.0), (0.9, -1, 0.9), (1.3, 3, 0.8)] * 2)]
    prompts = (_text_prompts() * 2)[:8]
    _, want = _run(model, prompts, params)
    engine, got = _run(model, prompts, params, k=2, mtp=mtp)
    _, again = _run(model, prompts, params, k=2, mtp=mtp)
    _same(got, want)
    _same(again, got)
    assert engine.scheduler.stats.accepted > 0


def test_the_mtp_state_travels_with_the_request(trained):
    """The MTP layer's ring is part of a request's state: a prefill engine computes it over the prompt and
    exports it, a decode engine imports it into another slot (equal rows), and the request decodes on there with
    the same tokens (retraction and forks move a state through the same views: engine/state_io.py)."""
    model, mtp = trained
    prompt, params = _text_prompts()[4], SamplingParams(max_new_tokens=20, ignore_eos=True)
    _, want = _run(model, [prompt], params)
    prefill = Engine(model, _pool(), speculative_num_steps=2, mtp=mtp)
    decode = Engine(model, _pool(), speculative_num_steps=2, mtp=mtp)
    request = prefill.submit(prompt, params)
    while not request.output_ids:
        prefill.step()
    descriptor, tensors = prefill.export_state(request)
    ring = prefill.pools.extra_slot_state["mtp.swa"]
    assert tensors["mtp.swa"].shape == (model.cfg.window, *ring.shape[2:]) and tensors["mtp.swa"].dtype == ring.dtype
    assert torch.equal(tensors["mtp.swa"], prefill.pools.extra_slot_state["mtp.swa"][request.slot])
    assert float(tensors["mtp.swa"].abs().sum()) > 0
    prefill.abort(request.request_id)
    blocker = decode.make_request([1, 2], params)
    decode.reserve(blocker)  # the request lands in another slot than it had
    moved = decode.make_request(prompt, params, request_id="moved")
    decode.reserve(moved)
    assert moved.slot != request.slot
    decode.import_state(moved, descriptor, tensors)
    decode.activate(moved)
    assert torch.equal(decode.pools.extra_slot_state["mtp.swa"][moved.slot], tensors["mtp.swa"])
    decode.scheduler.run_to_completion()
    assert moved.output_ids == want[0].output_ids and decode.scheduler.stats.accepted > 0
    decode.release(blocker)
    assert decode.is_idle_and_empty() and prefill.is_idle_and_empty()
    with pytest.raises(ValueError, match="mtp.swa"):  # an engine without speculation does not take it
        plain = Engine(model, _pool())
        target = plain.make_request(prompt, params)
        plain.reserve(target)
        plain.import_state(target, descriptor, tensors)


def test_a_request_restored_from_the_prefix_cache_drafts_as_a_cold_prefill(trained):
    """The prefix cache's snapshots keep the MTP layer's ring (captured by the drafter's forward in the same
    capture slots as the model's rings): a request restored at a page boundary holds the same MTP ring after its
    prefill as a cold prefill of its prompt, so it gets the same drafts and accepts as many."""
    model, mtp = trained
    text = (DEFAULT_CHECKPOINT / "heldout_sample.txt").read_bytes()
    prefix = list(text[:140])  # the default model's page is 128 tokens (its window 64): B restores at 128
    a, b = prefix + list(text[200:212]), prefix + list(text[300:305])
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)

    def prefill(engine, prompt):
        request = engine.submit(prompt, params)
        while not request.output_ids:
            engine.step()
        return request, engine.export_state(request)[1]

    cached = Engine(model, _pool(prefix_cache_entries=8), speculative_num_steps=2, mtp=mtp)
    cached.submit(a, params)
    cached.scheduler.run_to_completion()  # A's prefill (chunks of 40) snapshots the boundary 128
    restored, state = prefill(cached, b)
    assert restored.cached_tokens == 128
    cold_engine = Engine(model, _pool(), speculative_num_steps=2, mtp=mtp)
    cold, want = prefill(cold_engine, b)
    assert float(want["mtp.swa"].abs().sum()) > 0
    assert torch.equal(state["mtp.swa"], want["mtp.swa"])
    for engine in (cached, cold_engine):
        engine.scheduler.run_to_completion()
        assert engine.is_idle_and_empty()
    assert restored.output_ids == cold.output_ids
    assert (restored.spec_drafted, restored.spec_accepted) == (cold.spec_drafted, cold.spec_accepted)
    assert cold.spec_drafted > 0


def test_the_memory_plan_counts_the_mtp_layer(trained):
    """With MTP drafts the plan has a line for the MTP layer: its own weights (the embedding and head are the
    model's) and its one-layer pool, both as allocated."""
    model, mtp = trained
    engine = Engine(model, _pool(), speculative_num_steps=2, mtp=mtp)
    drafter = engine.scheduler.drafter
    line = next(x for x in engine.memory_plan().splitlines() if "MTP layer" in x)
    weights = sum(p.numel() * p.element_size() for p in mtp.parameters())
    assert 0 < weights < sum(p.numel() * p.element_size() for p in model.parameters())
    assert f"weights {gb(weights)}" in line and f"pool {gb(drafter.pools.num_bytes())}" in line
    assert drafter.pools.num_bytes() > 0
    assert "MTP layer" not in Engine(model, _pool()).memory_plan()
