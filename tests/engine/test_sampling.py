import math

import pytest
import torch

from sparsepd.engine.sampling import (
    Sampler,
    SamplingParams,
    filter_probs,
    finish_reason,
    sample_batch,
    sampling_tensors,
    token_logprobs,
)
from sparsepd.kernels.sampling import exponentials_ref


def _logits(seed: int) -> torch.Tensor:
    return torch.randn(300, generator=torch.Generator().manual_seed(seed)) * 3


def _drawn(logits: torch.Tensor, params: SamplingParams, counter: int) -> int:
    """The token the module doc of kernels/sampling.py defines, from its parts: the filtered probabilities of
    softmax(z / t) raced against the exponentials of (seed, counter)."""
    probs = filter_probs(torch.softmax(logits / params.temperature, dim=0), params.top_k, params.top_p, params.min_p)
    e = exponentials_ref(torch.tensor([params.seed]), torch.tensor([counter]), logits.shape[0])[0]
    return int(torch.argmax(probs / e))


def test_seeded_sampling_is_reproducible():
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=123)
    a = [Sampler(params, 300).sample(_logits(i)) for i in range(20)]  # a fresh sampler: each the first draw
    assert a == [_drawn(_logits(i), params, counter=0) for i in range(20)]
    s1, s2 = Sampler(params, 300), Sampler(params, 300)
    b = [s1.sample(_logits(i)) for i in range(20)]
    c = [s2.sample(_logits(i)) for i in range(20)]
    assert b == c == [_drawn(_logits(i), params, counter=i) for i in range(20)]  # draw i from the stream's i-th
    other = Sampler(SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=124), 300)
    assert [other.sample(_logits(i)) for i in range(20)] != b


# Twelve tokens whose probabilities fall off: each filter below drops a third of the mass or more.
PROBS = torch.tensor([0.22, 0.18, 0.14, 0.11, 0.09, 0.07, 0.06, 0.05, 0.04, 0.02, 0.01, 0.01])
DRAWS = 4000


def _chi2_critical(df: int, z: float = 3.09) -> float:
    """The chi-square quantile at significance 1e-3 (z its normal quantile), Wilson–Hilferty."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize("path", ["engine", "sampler"])
@pytest.mark.parametrize("one_filter", [{"top_p": 0.6}, {"top_k": 3}, {"min_p": 0.45}], ids=["top_p", "top_k", "min_p"])
def test_each_filter_alone_draws_the_filtered_distribution(one_filter, path):
    """4,000 draws of one request (the random streams of counters 0…3999) through the engine's batched path
    (`sampling_tensors` → `sample_batch`, as engine/draw.py builds them) or through `Sampler.sample`: never a
    token outside the filter's support, and counts that pass a chi-square test (p > 0.001) against the exact
    filtered distribution. Without the filter a third of the draws or more would fall outside."""
    params = SamplingParams(temperature=1.0, seed=4242, **one_filter)
    logits, vocab = PROBS.log(), PROBS.shape[0]
    exact = filter_probs(PROBS, params.top_k, params.top_p, params.min_p)
    support = exact > 0
    assert float(PROBS[~support].sum()) >= 0.3  # the filter matters
    sampler = Sampler(params, vocab)
    if path == "engine":
        rows = [(params, sampler, n, vocab - 1) for n in range(DRAWS)]
        tokens = sample_batch(logits.expand(DRAWS, vocab).contiguous(), sampling_tensors(rows, "cpu")).tokens
    else:
        tokens = torch.tensor([sampler.sample(logits) for _ in range(DRAWS)])
    counts = torch.bincount(tokens, minlength=vocab).double()
    outside = {i: int(c) for i, c in enumerate(counts.tolist()) if c and not support[i]}
    assert not outside, f"{params}: drawn outside the support {support.nonzero().flatten().tolist()}: {outside}"
    want = DRAWS * exact[support].double()
    chi2 = float(((counts[support] - want) ** 2 / want).sum())
    df = int(support.sum()) - 1
    assert chi2 < _chi2_critical(df), (f"{params}: chi-square {chi2:.1f} over {df} degrees of freedom; counts "
                                      f"{counts[support].tolist()}, expected {want.tolist()}")


def test_sampler_state_ships():
    params = SamplingParams(temperature=0.8, seed=9)
    s1 = Sampler(params, 300)
    s1.sample(_logits(0))
    s2 = Sampler(params, 300)
    s2.set_state(s1.get_state())
    assert [s1.sample(_logits(i)) for i in range(10)] == [s2.sample(_logits(i)) for i in range(10)]


def test_greedy_and_top_k_one_pick_the_argmax():
    logits = _logits(3)
    best = int(logits.argmax())
    assert Sampler(SamplingParams(), 300).sample(logits) == best
    assert Sampler(SamplingParams(temperature=1.5, top_k=1, seed=1), 300).sample(logits) == best


def test_filters():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    assert filter_probs(probs, 2, 1.0, 0.0).tolist() == pytest.approx([0.625, 0.375, 0, 0])
    assert filter_probs(probs, -1, 0.6, 0.0).tolist() == pytest.approx([0.625, 0.375, 0, 0])
    assert filter_probs(probs, -1, 0.5, 0.0).tolist() == pytest.approx([1, 0, 0, 0])
    assert filter_probs(probs, -1, 1.0, 0.5).tolist() == pytest.approx([0.625, 0.375, 0, 0])


@pytest.mark.parametrize("field,value", [("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -2),
                                         ("min_p", 1.0), ("max_new_tokens", 0), ("seed", -1),
                                         ("stop_token_ids", (-3,)), ("nucleus", 0.5)])
def test_bad_params_raise_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams.checked(**{field: value})


def test_stop_token_outside_vocab_raises():
    with pytest.raises(ValueError, match="outside the vocabulary"):
        Sampler(SamplingParams(stop_token_ids=(999,)), 300)


def test_finish_reason():
    p = SamplingParams(max_new_tokens=3, stop_token_ids=(7,))
    assert finish_reason(5, 1, p, eos_id=9) is None
    assert finish_reason(7, 1, p, eos_id=9) == "stop"
    assert finish_reason(9, 1, p, eos_id=9) == "stop"
    assert finish_reason(9, 1, SamplingParams(ignore_eos=True), eos_id=9) is None
    assert finish_reason(5, 3, p, eos_id=9) == "length"


def test_banned_tokens_are_never_drawn():
    logits = _logits(5)
    best = int(torch.argmax(logits))
    greedy = Sampler(SamplingParams(), 300)
    assert greedy.sample(logits) == best
    second = int(torch.topk(logits, 2).indices[1])
    assert greedy.sample(logits, [best]) == second
    hot = Sampler(SamplingParams(temperature=5.0, seed=1), 300)
    banned = torch.topk(logits, 20).indices.tolist()
    assert not set(hot.sample(logits, banned) for _ in range(200)) & set(banned)
    assert torch.isfinite(logits).all()  # the caller's logits are not modified


def test_banned_follows_min_new_tokens():
    params = SamplingParams(min_new_tokens=3, stop_token_ids=(7, 5))
    assert params.banned(0, eos_id=1) == [1, 5, 7]
    assert params.banned(2, eos_id=1) == [1, 5, 7]
    assert params.banned(3, eos_id=1) == []
    assert SamplingParams(min_new_tokens=3, ignore_eos=True).banned(0, eos_id=1) == []


def test_token_logprobs_are_the_log_softmax():
    logits = _logits(9)
    want = torch.log_softmax(logits.double(), -1)
    got = token_logprobs(logits, 17, top_n=4)
    assert abs(got.logprob - float(want[17])) < 1e-5
    order = torch.argsort(want, descending=True)[:4].tolist()
    assert list(got.top_ids) == order
    assert all(abs(v - float(want[i])) < 1e-5 for i, v in zip(got.top_ids, got.top_logprobs, strict=True))
    assert list(got.top_logprobs) == sorted(got.top_logprobs, reverse=True)
    assert token_logprobs(logits, 17, top_n=0).top_ids == ()
    with pytest.raises(ValueError, match="top_logprobs"):
        SamplingParams.checked(top_logprobs=21)
