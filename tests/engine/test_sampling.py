import pytest
import torch

from sparsepd.engine.sampling import Sampler, SamplingParams, filter_probs, finish_reason


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
