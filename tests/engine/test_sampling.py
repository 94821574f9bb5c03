import pytest
import torch

from sparsepd.engine.sampling import Sampler, SamplingParams, filter_probs, finish_reason, token_logprobs


def _logits(seed: int) -> torch.Tensor:
    return torch.randn(300, generator=torch.Generator().manual_seed(seed)) * 3


def test_seeded_sampling_is_reproducible():
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=123)
    a = [Sampler(params, 300).sample(_logits(i)) for i in range(20)]
    s1, s2 = Sampler(params, 300), Sampler(params, 300)
    b = [s1.sample(_logits(i)) for i in range(20)]
    c = [s2.sample(_logits(i)) for i in range(20)]
    assert b == c
    other = Sampler(SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=124), 300)
    assert [other.sample(_logits(i)) for i in range(20)] != b
    assert len(a) == 20


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
