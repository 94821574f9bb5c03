"""Prompt log-probabilities and token_ids_logprob in the engine: the values scored chunk by chunk during the
paged prefill equal a plain log-softmax over the reference model's logits of the whole prompt (from
logprob_start_len 0, mid-prompt, the last token, a prompt longer than the chunk budget, beside a request that
does not ask); so do generate()'s and the output tokens' values at the requested ids; slicing the head does not
change a bit."""

from __future__ import annotations

import pytest
import torch

from sparsepd.engine.engine import Engine
from sparsepd.engine.generate import generate
from sparsepd.engine.pools import PoolConfig
from sparsepd.engine.prompt_logprobs import plan_rows, score_rows
from sparsepd.engine.request import PromptLogprobs, Request
from sparsepd.engine.sampling import SamplingParams
from sparsepd.model.weights import build_model
from sparsepd.model_config import get_preset

SEED = 7
IDS = (5, 200, 5, 31)  # token_ids_logprob: order kept, repeats allowed
TOP = 3


@pytest.fixture(scope="module")
def model():
    return build_model(get_preset("tiny"), seed=0)


@pytest.fixture(scope="module")
def prompts():
    gen = torch.Generator().manual_seed(SEED)
    return [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (33, 9)]


@pytest.fixture(scope="module")
def full_logits(model, prompts):
    """log_softmax of the plain model's logits at every prompt position (one forward over each prompt)."""
    return [torch.log_softmax(model.prefill(torch.tensor(p))[0], dim=-1) for p in prompts]


def _params(start: int | None, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=3, ignore_eos=True, logprobs=True, top_logprobs=TOP, token_ids_logprob=IDS,
                          logprob_start_len=start, **kw)


SAMPLED = dict(temperature=0.7, seed=11)


@pytest.fixture(scope="module")
def short_reference(model, prompts):
    """generate() from mid-prompt, prefilled in chunks of 4, sampling with a seed."""
    return generate(model, prompts[1], _params(4, **SAMPLED), prefill_chunk=4)


def _assert_close(got: float, want: float, where: str) -> None:
    assert abs(got - want) <= 1e-5 * abs(want) + 1e-7, f"seed {SEED}, {where}: {got} vs {want}"


def _check_prompt(prompt_lp, logp: torch.Tensor, prompt: list[int], start: int) -> None:
    """Token p (start < p < L): logp[p-1] at prompt[p], its top ones, its values at IDS; token start: none."""
    assert prompt_lp.start == start and len(prompt_lp.positions) == len(prompt) - 1 - start
    for i, got in enumerate(prompt_lp.positions):
        p = start + 1 + i
        row = logp[p - 1]
        _assert_close(got.logprob, float(row[prompt[p]]), f"position {p}")
        top = torch.sort(row, descending=True, stable=True)
        assert got.top_ids == tuple(top.indices[:TOP].tolist()), f"seed {SEED}, position {p}"
        for g, w in zip(got.top_logprobs, top.values[:TOP].tolist(), strict=True):
            _assert_close(g, w, f"top at position {p}")
        for g, t in zip(got.ids_logprobs, IDS, strict=True):
            _assert_close(g, float(row[t]), f"id {t} at position {p}")


def test_reference_prompt_logprobs_are_the_log_softmax_of_the_prompt_logits(prompts, full_logits, short_reference):
    _check_prompt(short_reference.prompt_logprobs, full_logits[1], prompts[1], 4)


@pytest.mark.parametrize("overlap", [False, True])
def test_engine_scores_the_prompt_chunk_by_chunk_beside_other_requests(model, prompts, full_logits, short_reference,
                                                                       overlap):
    """Budget 16 < 33: the long prompt (from 0) is prefilled in 3 chunks, beside the short one from mid-prompt,
    from its last token (no values) and a plain request (the plain path); every prompt value equals the
    whole-prompt reference, and the outputs' values (at IDS too) equal generate()'s; with the scheduler's
    overlap (the decode worker's default) too."""
    engine = Engine(model, PoolConfig(num_slots=4, max_batch_tokens=16, num_pages=32), overlap=overlap)
    long, short = prompts
    plain = SamplingParams(max_new_tokens=3, ignore_eos=True)
    requests = [engine.submit(long, _params(0)), engine.submit(short, _params(4, **SAMPLED)),
                engine.submit(short, plain), engine.submit(short, _params(8))]
    engine.scheduler.run_to_completion()
    _check_prompt(_prompt(requests[0]), full_logits[0], long, 0)
    _check_prompt(_prompt(requests[1]), full_logits[1], short, 4)
    _check_prompt(_prompt(requests[3]), full_logits[1], short, 8)
    assert requests[2].prompt_logprobs == [] and requests[2].output_logprobs == []
    want = short_reference
    assert requests[1].output_ids == want.output_ids
    for i, (g, w) in enumerate(zip(requests[1].output_logprobs, want.logprobs, strict=True)):
        assert g.top_ids == w.top_ids and len(g.ids_logprobs) == len(IDS), f"seed {SEED}, output {i}"
        for a, b in zip((g.logprob, *g.top_logprobs, *g.ids_logprobs), (w.logprob, *w.top_logprobs, *w.ids_logprobs),
                        strict=True):
            _assert_close(a, b, f"output {i}")
    assert engine.is_idle_and_empty()


def _prompt(request: Request) -> PromptLogprobs:
    return PromptLogprobs(request.params.logprob_start_len, tuple(request.prompt_logprobs))


def test_rows_are_planned_per_chunk_and_scoring_in_slices_changes_nothing(model, prompts):
    """A decode token, then two prefill chunks: the rows are the chunk positions in [start, L-2], targets the
    next prompt tokens; scoring 1, 3 or all rows at a time gives the same bits."""
    long, short = prompts
    make = lambda ids, params: Request("r", ids, params, None)  # noqa: E731 - plan_rows reads ids, params, progress
    decoding, first, second = make(short, _params(0)), make(long, _params(5)), make(short, _params(None))
    decoding.num_computed, first.num_computed = len(short), 3
    work = [(decoding, [7]), (first, long[3:12]), (second, short[:4])]
    rows = plan_rows(work)
    assert rows.rows == [1 + p - 3 for p in range(5, 12)] and rows.targets == long[6:13]
    assert [(r is first, n) for r, n in rows.owners] == [(True, 7)] and rows.top_n == TOP
    assert plan_rows([(second, short)]) is None  # nobody asks: the plain path
    gen = torch.Generator().manual_seed(SEED)
    hidden = torch.randn(len(rows.rows), model.cfg.hc_mult, model.cfg.dim, generator=gen)
    whole = score_rows(model, hidden, rows)
    for step in (1, 3):
        sliced = score_rows(model, hidden, rows, rows_per_slice=step)
        for name in ("logprobs", "top_ids", "top_logprobs", "ids_logprobs"):
            assert torch.equal(getattr(whole, name), getattr(sliced, name)), (name, step)
    logp = torch.log_softmax(model.logits(hidden), dim=-1)
    assert torch.equal(whole.logprobs, logp.gather(1, torch.tensor(rows.targets)[:, None])[:, 0])


def test_a_start_beyond_the_prompt_is_refused(model):
    engine = Engine(model, PoolConfig(num_slots=1, max_batch_tokens=16, num_pages=4))
    with pytest.raises(ValueError, match="logprob_start_len=5 must be < the prompt's 5 tokens"):
        engine.submit([1, 2, 3, 4, 5], _params(5))
    with pytest.raises(ValueError, match="token_ids_logprob ids \\[300\\]"):
        engine.submit([1, 2], SamplingParams(token_ids_logprob=(300,)))
