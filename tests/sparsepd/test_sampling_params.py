"""The sampling parameters are defined once (sparsepd/sampling_params.py): each bound admits exactly what the
model accepts, a refusal names the field, the value and the bound in the same words on every path, and the
worker-control message carries the parameters unchanged (proto/convert.py), its proto3 zeros read as unset."""

from __future__ import annotations

import math
import random
import re

import numpy as np
import pytest

from sparsepd.grammar import Grammar
from sparsepd.proto import worker_pb2
from sparsepd.proto.convert import sampling_from_proto, sampling_to_proto
from sparsepd.sampling_params import BOUNDS, ZERO_IS_UNSET, SamplingParams, unset_zero

# Per bounded field: values just inside and just outside each limit, and the non-finite ones.
PROBES = [math.nan, math.inf, -math.inf, -3.0, -2.0, -1.5, -1, -1e-9, 0, 0.0, 1e-9, 0.5, 1, 1.0, 1.0000001, 2.0, 2.5,
          20, 21, 99.5, 100.0, 100.5, 2**31 - 1, 2**31, 2**63 - 1, 2**63]


INTEGER_FIELDS = {"top_k", "seed", "max_new_tokens", "min_new_tokens", "top_logprobs", "logprob_start_len"}


def _model_accepts(name: str, value: float) -> bool:
    try:
        SamplingParams(**({"logit_bias": ((3, value),)} if name == "logit_bias" else {name: value}))
    except ValueError:
        return False
    return True


@pytest.mark.parametrize("name", sorted(BOUNDS))
def test_each_bound_admits_exactly_what_the_model_accepts(name):
    bound = BOUNDS[name]
    if name in INTEGER_FIELDS:  # the integer probes (a float is no value of these fields)
        probes = sorted({int(v) for v in PROBES if math.isfinite(v) and float(v).is_integer()})
    else:
        probes = PROBES
    assert len(probes) > 10
    for value in probes:
        assert bound.admits(value) == _model_accepts(name, value), (name, value)


@pytest.mark.parametrize("name, value, words", [
    ("temperature", -0.5, "temperature=-0.5 is out of range: allowed finite and ≥ 0 (below 1e-6 = greedy)"),
    ("temperature", math.nan, "temperature=nan is out of range"),
    ("top_p", 0.0, "top_p=0 is out of range: allowed in (0, 1]"),
    ("min_p", 1.0, "min_p=1 is out of range: allowed in [0, 1)"),
    ("top_k", -2, "top_k=-2 is out of range: allowed -1 or 0 (off) or ≥ 1"),
    ("seed", 2**63, f"seed={2**63} is out of range: allowed 0..{2**63 - 1}"),
    ("repetition_penalty", -1.0, "repetition_penalty=-1 is out of range: allowed > 0"),
    ("top_logprobs", 21, "top_logprobs=21 is out of range: allowed 0..20"),
])
def test_a_refusal_names_the_field_the_value_and_the_bound(name, value, words):
    assert words in BOUNDS[name].error(name, value)
    with pytest.raises(ValueError) as err:
        SamplingParams.checked(**{name: value})
    assert str(err.value) == f"invalid sampling parameters: {BOUNDS[name].error(name, value)}"


def test_every_bad_field_is_named_in_one_message():
    with pytest.raises(ValueError) as err:
        SamplingParams.checked(top_p=1.5, max_new_tokens=0, nucleus=0.5, stop_token_ids=(-3,))
    message = str(err.value)
    for part in ("top_p=1.5 is out of range: allowed in (0, 1]", "max_new_tokens=0 is out of range: allowed ≥ 1",
                 "nucleus=0.5", "stop_token_ids=(-3,)"):
        assert part in message, message


def test_ids_outside_the_vocabulary_are_refused_by_kind():
    SamplingParams(stop_token_ids=(299,), logit_bias=((299, 1.0),), token_ids_logprob=(299,)).check_vocabulary(300)
    for values, words in [({"stop_token_ids": (300,)}, "stop token ids [300]"),
                          ({"logit_bias": ((5, 1.0), (301, 2.0))}, "logit_bias token ids [301]"),
                          ({"token_ids_logprob": (7, 300)}, "token_ids_logprob ids [300]")]:
        with pytest.raises(ValueError, match=re.escape(f"{words} are outside the vocabulary [0, 300)")):
            SamplingParams(**values).check_vocabulary(300)


def test_a_proto3_zero_is_unset_only_where_that_is_the_rule():
    assert unset_zero("top_p", 0.0) == 1.0 and unset_zero("repetition_penalty", 0.0) == 1.0
    assert unset_zero("top_p", 0.25) == 0.25 and unset_zero("temperature", 0.0) == 0.0
    assert unset_zero("min_p", 0.0) == 0.0 and set(ZERO_IS_UNSET) == {"top_p", "repetition_penalty"}
    empty = sampling_from_proto(worker_pb2.SamplingParams(max_new_tokens=4))
    assert empty == SamplingParams(max_new_tokens=4, top_k=0)  # the rest: the proto's zeros (top_k 0 is off too)


def _f32(x: float) -> float:
    """What a float field of the message holds."""
    return float(np.float32(x))


def _random_params(rng: random.Random) -> SamplingParams:
    f32 = _f32
    return SamplingParams(
        temperature=f32(rng.choice([0.0, rng.uniform(0, 3)])), top_k=rng.choice([-1, 0, 1, rng.randrange(2, 500)]),
        top_p=f32(rng.uniform(0.01, 1)), min_p=f32(rng.uniform(0, 0.99)),
        seed=rng.choice([None, 0, rng.randrange(2**63)]), max_new_tokens=rng.randrange(1, 4096),
        stop_token_ids=tuple(sorted(rng.sample(range(1000), rng.randrange(4)))), ignore_eos=rng.random() < 0.5,
        min_new_tokens=rng.randrange(3), logprobs=rng.random() < 0.5, top_logprobs=rng.randrange(21),
        frequency_penalty=f32(rng.uniform(-2, 2)), presence_penalty=f32(rng.uniform(-2, 2)),
        repetition_penalty=f32(rng.uniform(0.1, 3)),
        logit_bias=tuple(sorted((i, f32(rng.uniform(-100, 100))) for i in rng.sample(range(1000), rng.randrange(4)))),
        token_ids_logprob=tuple(rng.choices(range(1000), k=rng.randrange(5))),
        logprob_start_len=rng.choice([None, 0, rng.randrange(100)]),
        grammar=rng.choice([None, Grammar(kind="regex", text="[a-z]+"), Grammar(kind="json_schema", text="{}")]))


def test_the_worker_message_carries_the_parameters_unchanged():
    rng = random.Random(29)
    for _ in range(200):
        params = _random_params(rng)
        msg = sampling_to_proto(params)
        assert sampling_from_proto(worker_pb2.SamplingParams.FromString(msg.SerializeToString())) == params


def test_a_bad_worker_message_is_refused_naming_the_field():
    with pytest.raises(ValueError, match=r"min_p=1 is out of range: allowed in \[0, 1\)"):
        sampling_from_proto(worker_pb2.SamplingParams(max_new_tokens=4, min_p=1.0))
    with pytest.raises(ValueError, match="max_new_tokens=0 is out of range"):
        sampling_from_proto(worker_pb2.SamplingParams())
