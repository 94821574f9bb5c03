"""No sampling parameter can fail another request: extreme values are refused at the edge or given a meaning
(SGLang's: a temperature below 1e-6 is greedy), the batched sampler never turns any value into NaN, and a row
that fails anyway fails its own request only, while its batch-mates finish with the reference tokens."""

from __future__ import annotations

import math
import random

import pytest
import torch

from sparsepd.engine.engine import Engine
from sparsepd.engine.pools import PoolConfig
from sparsepd.engine.sampling import SAMPLING_EPS, Sampler, SamplingParams, sampling_tensors
from sparsepd.kernels.sampling import SamplingTensors, sample_batch, sample_batch_ref
from sparsepd.model.weights import build_model
from sparsepd.model_config import get_preset

FP32_MAX = torch.finfo(torch.float32).max
TEMPERATURES = [math.nan, math.inf, -0.0, 0.0, 5e-324, 1e-45, 1e-30, 1e-7, SAMPLING_EPS, 0.7, 1e30, FP32_MAX]
TOP_K = [-1, 0, 1, 2, 7, 2**31 - 1]
TOP_P = [1e-45, 1e-30, 0.3, 1.0]
MIN_P = [0.0, 1e-45, 0.5, 0.999999]


@pytest.mark.parametrize("field,value", [("temperature", math.inf), ("temperature", math.nan),
                                         ("temperature", -1.0), ("top_p", math.nan), ("top_p", math.inf),
                                         ("min_p", math.nan), ("top_k", 2**31)])
def test_non_finite_or_out_of_range_parameters_are_refused_by_name(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams.checked(**{field: value})


def test_a_temperature_below_the_epsilon_is_greedy():
    assert SamplingParams(temperature=1e-30).greedy and SamplingParams(temperature=5e-324).greedy
    assert not SamplingParams(temperature=SAMPLING_EPS).greedy


def _fuzz_batch(seed: int, B: int, V: int) -> tuple[torch.Tensor, SamplingTensors]:
    """Logits with huge, infinite and NaN entries; every extreme of every parameter; a fully banned row."""
    rng = random.Random(seed)
    logits = torch.randn(B, V, generator=torch.Generator().manual_seed(seed)) * 3  # [B, V]
    for b in range(B):
        kind = rng.randrange(5)
        if kind == 1:
            logits[b, rng.randrange(V)] = rng.choice([1e30, -1e30, FP32_MAX])
        elif kind == 2:
            logits[b, rng.sample(range(V), 3)] = torch.tensor([math.inf, -math.inf, math.nan])
        elif kind == 3:
            logits[b] *= 1e30
    ban = torch.full((B, V), -1, dtype=torch.int64)
    for b in range(B):
        banned = range(V) if b == 0 else rng.sample(range(V), rng.randrange(V // 2))
        ban[b, : len(banned)] = torch.tensor(list(banned), dtype=torch.int64)
    col = lambda values, dtype: torch.tensor([rng.choice(values) for _ in range(B)], dtype=dtype)  # noqa: E731
    params = SamplingTensors(temperature=col(TEMPERATURES, torch.float32), top_k=col(TOP_K, torch.int32),
                             top_p=col(TOP_P, torch.float32), min_p=col(MIN_P, torch.float32),
                             seed=col(range(2**20), torch.int64), counter=col(range(100), torch.int64), ban_ids=ban,
                             want_top_logprobs=3)
    return logits, params


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_extreme_values_never_make_nan_and_every_row_draws_alone(seed):
    B, V = 48, 37
    logits, params = _fuzz_batch(seed, B, V)
    out, ref = sample_batch(logits, params), sample_batch_ref(logits, params)
    tokens = out.tokens.tolist()
    assert all(0 <= t < V for t in tokens), tokens
    assert tokens == ref.tokens.tolist(), (seed, tokens, ref.tokens.tolist())
    for b in range(1, B):  # row 0 bans everything: the ban is lifted there
        assert tokens[b] not in params.ban_ids[b].tolist(), (seed, b, tokens[b])
        t = float(params.temperature[b])
        if not t >= SAMPLING_EPS or int(params.top_k[b]) == 1:  # greedy: the best allowed (NaN counts as −inf)
            z = logits[b].nan_to_num(nan=-math.inf).clone()
            z[[i for i in params.ban_ids[b].tolist() if i >= 0]] = -math.inf
            assert z[tokens[b]] == z.max(), (seed, b)
    for b in range(B):  # the same draw alone as in the batch
        alone = SamplingTensors(*(getattr(params, f)[b : b + 1] for f in
                                  ("temperature", "top_k", "top_p", "min_p", "seed", "counter", "ban_ids")))
        assert int(sample_batch(logits[b : b + 1], alone).tokens[0]) == tokens[b], (seed, b)


def test_engine_params_at_the_extremes_draw_without_nan():
    V = 300
    logits = torch.randn(V, generator=torch.Generator().manual_seed(5)) * 3
    for temperature in (1e-30, SAMPLING_EPS, 1e30, 1e300):  # 1e300 is inf in fp32: clamped to fp32's largest
        for extra in ({}, {"top_k": 5}, {"min_p": 0.5}, {"top_p": 1e-30}, {"min_new_tokens": 5}):
            params = SamplingParams(temperature=temperature, seed=1, **extra)
            token = Sampler(params, V).sample(logits, banned=params.banned(0, 2))
            assert 0 <= token < V and token not in params.banned(0, 2)
            if temperature < SAMPLING_EPS or (extra.get("top_p") == 1e-30 and temperature < 1):
                assert token == int(logits.argmax())  # (at 1e30 every probability is 1/V: a tie)


@pytest.fixture(scope="module")
def model():
    return build_model(get_preset("tiny"), seed=0)


def _run(model, prompts, overlap, bad_row: bool):
    engine = Engine(model, PoolConfig(num_slots=8, max_batch_tokens=96, num_pages=32), overlap=overlap)
    greedy = SamplingParams(max_new_tokens=4, ignore_eos=True)
    requests = [engine.submit(p, greedy, f"ok-{i}") for i, p in enumerate(prompts)]
    bad = None
    if bad_row:
        bad = engine.submit(prompts[0], SamplingParams(temperature=0.8, min_new_tokens=4, max_new_tokens=6), "bad")
        bad.sampler.seed = 2**64  # no int64 holds it: building the batch's tensors raises
    engine.scheduler.run_to_completion()
    assert engine.is_idle_and_empty()
    return requests, bad


def test_a_row_that_fails_fails_its_request_alone(model):
    """With overlap (the decode worker's mode): the failing row's next step is already launched when it fails."""
    overlap = True
    gen = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (3, 17, 9)]
    want, _ = _run(model, prompts, overlap, bad_row=False)  # the engine is batch invariant: the same tokens
    got, bad = _run(model, prompts, overlap, bad_row=True)
    assert bad.finish_reason == "error" and "request bad" in bad.error and bad.output_ids == []
    assert [r.output_ids for r in got] == [r.output_ids for r in want]
    assert all(len(r.output_ids) == 4 and r.finish_reason == "length" and not r.error for r in got)


def test_sampling_tensors_of_extreme_params_hold_what_the_sampler_needs():
    rows = [(SamplingParams(temperature=t, top_k=k), Sampler(SamplingParams(), 10), 0, 2)
            for t, k in ((1e-30, -1), (1e30, 2**31 - 1))]
    built = sampling_tensors(rows, "cpu")
    assert built.top_k.tolist() == [-1, 2**31 - 1] and built.all_greedy is False
    assert torch.isfinite(built.temperature).all()


def _run_mixed(model, overlap: bool, bad_row: bool):
    """A grammar request, a request asking for top and token_ids log-probabilities, a seeded sampled one,
    and (bad_row) one whose draw raises, in the same batches."""
    from sparsepd.grammar import Grammar

    engine = Engine(model, PoolConfig(num_slots=8, max_batch_tokens=96, num_pages=48), overlap=overlap)
    grammar = Grammar(kind="regex", text="[a-z]{2,4}-(x|y)")
    requests = [
        engine.submit([256, *b"ab"], SamplingParams(max_new_tokens=8, grammar=grammar), "grammar"),
        engine.submit([256, *b"cde"], SamplingParams(max_new_tokens=4, ignore_eos=True, logprobs=True,
                                                     top_logprobs=3, token_ids_logprob=[5, 7, 11]), "logprobs"),
        engine.submit([256, *b"f"], SamplingParams(max_new_tokens=4, ignore_eos=True, temperature=0.9, seed=3),
                      "sampled"),
    ]
    bad = None
    if bad_row:
        bad = engine.submit([256, *b"gh"], SamplingParams(temperature=0.8, max_new_tokens=6), "bad")
        bad.sampler.seed = 2**64  # building the batch's tensors raises: the batch is drawn row by row
    engine.scheduler.run_to_completion()
    assert engine.is_idle_and_empty()
    return requests, bad


@pytest.mark.parametrize("overlap", [False, True])
def test_a_failing_row_beside_grammar_and_log_probability_rows(model, overlap):
    """The row-by-row fallback keeps each row's grammar mask and its token_ids_logprob values: the others'
    tokens and log-probabilities equal a run without the failing row."""
    want, _ = _run_mixed(model, overlap, bad_row=False)
    got, bad = _run_mixed(model, overlap, bad_row=True)
    assert bad.finish_reason == "error" and "request bad" in bad.error and bad.output_ids == []
    assert [r.output_ids for r in got] == [r.output_ids for r in want]
    assert [r.finish_reason for r in got] == [r.finish_reason for r in want]
    for g, w in zip(got[1].output_logprobs, want[1].output_logprobs, strict=True):
        assert g.top_ids == w.top_ids and len(g.ids_logprobs) == 3
        assert g.ids_logprobs == pytest.approx(w.ids_logprobs, rel=1e-5, abs=1e-6)
        assert g.logprob == pytest.approx(w.logprob, rel=1e-5, abs=1e-6)
