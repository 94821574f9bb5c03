"""Penalties and logit bias (kernels/sampling.py `apply_penalties`, engine/penalties.py's slot history) against
the per-row reference computed id by id from each row's token history."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from sparsepd.engine.penalties import SlotHistory, decode_prompt_ids, encode_prompt_ids, penalty_tensors
from sparsepd.engine.sampling import Sampler, SamplingParams, sampling_tensors
from sparsepd.kernels.sampling import apply_penalties, apply_penalties_row, sample_batch, sample_batch_ref


def _rows(seed: int, B: int, V: int):
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for b in range(B):
        r = lambda lo, hi: float(torch.empty(()).uniform_(lo, hi, generator=gen))  # noqa: E731
        plain = b % 4 == 3  # some rows use nothing: they must come out bit for bit
        bias_ids = torch.randperm(V, generator=gen)[: int(torch.randint(0, 5, (), generator=gen))].tolist()
        params = SamplingParams(
            max_new_tokens=64, frequency_penalty=0.0 if plain else r(-2, 2),
            presence_penalty=0.0 if plain else r(-2, 2), repetition_penalty=1.0 if plain else r(0.3, 2.5),
            logit_bias=() if plain else tuple((i, r(-100, 100)) for i in bias_ids))
        prompt = torch.randint(0, V, (int(torch.randint(1, 40, (), generator=gen)),), generator=gen).tolist()
        output = torch.randint(0, min(V, 13), (int(torch.randint(0, 30, (), generator=gen)),), generator=gen).tolist()
        rows.append((params, prompt, output))
    return rows


def _reference(logits: torch.Tensor, rows) -> torch.Tensor:
    return torch.stack([apply_penalties_row(logits[b], prompt, output, p.frequency_penalty, p.presence_penalty,
                                            p.repetition_penalty, dict(p.logit_bias))
                        for b, (p, prompt, output) in enumerate(rows)])


def _bound(rows, V: int, num_slots: int):
    """A SlotHistory with row b's request bound to slot num_slots - 1 - b; its samplers, its requests."""
    history = SlotHistory(num_slots, V, "cpu")
    requests = [SimpleNamespace(params=p, uses_history=p.uses_history, sampler=Sampler(p, V), prompt_ids=prompt,
                                output_ids=output, slot=num_slots - 1 - b)
                for b, (p, prompt, output) in enumerate(rows)]
    history.bind(requests)
    return history, requests


@pytest.mark.parametrize(("seed", "B", "V"), [(0, 1, 17), (1, 8, 257), (2, 13, 1823)])
def test_batched_penalties_equal_the_per_row_reference(seed, B, V):
    rows = _rows(seed, B, V)
    logits = torch.randn(B, V, generator=torch.Generator().manual_seed(seed)) * 4
    _, requests = _bound(rows, V, num_slots=B + 3)
    table = [(p, r.sampler, len(r.output_ids), 0) for (p, *_), r in zip(rows, requests, strict=True)]
    got = apply_penalties(logits, penalty_tensors(table, torch.device("cpu")))
    want = _reference(logits, rows)
    bad = (got != want).nonzero()
    assert bad.numel() == 0, f"seed {seed} B {B} V {V}: mismatches at {bad[:5].tolist()}"
    plain = [b for b, (p, *_) in enumerate(rows) if not p.penalized]
    assert torch.equal(got[plain], logits[plain])


def test_recorded_tokens_update_the_counts_like_the_history():
    """record() from a step's device tokens (as remember_tokens gets them), over several steps, equals rebuilding
    from prompt + output ids; a slot rebound to another request starts from that request's history."""
    V, rows = 61, _rows(5, 6, 61)
    history, requests = _bound(rows, V, num_slots=8)
    gen = torch.Generator().manual_seed(9)
    for _ in range(7):
        sampled = [b for b in range(len(rows)) if torch.rand((), generator=gen) < 0.7]
        tokens = torch.randint(0, V, (len(sampled),), generator=gen)
        history.record([requests[b].slot for b in sampled], tokens)
        for b, t in zip(sampled, tokens.tolist(), strict=True):
            requests[b].output_ids = [*requests[b].output_ids, t]
    fresh, _ = _bound([(p, prompt, r.output_ids) for (p, prompt, _), r in zip(rows, requests, strict=True)], V, 8)
    active = sorted(history.active)
    assert active == sorted(r.slot for r in requests if r.params.uses_history)
    assert torch.equal(history.counts[active], fresh.counts[active])
    assert torch.equal(history.prompt_mask[active], fresh.prompt_mask[active])
    # slot reuse: another request with a penalty gets its own history, one without stops the counting
    newcomer = SimpleNamespace(params=SamplingParams(frequency_penalty=1.0), uses_history=True,
                               sampler=Sampler(SamplingParams(), V), prompt_ids=[1], output_ids=[4, 4], slot=active[0])
    history.bind([newcomer])
    assert history.counts[active[0]].tolist() == [2 if i == 4 else 0 for i in range(V)]
    history.bind([SimpleNamespace(params=SamplingParams(), uses_history=False, sampler=None, prompt_ids=[1],
                                  output_ids=[], slot=active[1])])
    assert active[1] not in history.active


def test_sample_batch_with_penalties_equals_the_reference_sampler():
    V, rows = 257, _rows(3, 9, 257)
    rows = [(p.model_copy(update={"temperature": 0.0 if b % 2 else 0.8, "seed": b}), prompt, output)
            for b, (p, prompt, output) in enumerate(rows)]
    logits = torch.randn(len(rows), V, generator=torch.Generator().manual_seed(3)) * 3
    _, requests = _bound(rows, V, num_slots=len(rows))
    table = [(p, r.sampler, len(r.output_ids), 0) for (p, *_), r in zip(rows, requests, strict=True)]
    params = sampling_tensors(table, "cpu")
    params.penalties = penalty_tensors(table, torch.device("cpu"))
    got, want = sample_batch(logits, params), sample_batch_ref(logits, params)
    assert torch.equal(got.tokens, want.tokens)
    penalized = _reference(logits, rows)
    greedy = [b for b, (p, *_) in enumerate(rows) if p.greedy]
    assert got.tokens[greedy].tolist() == penalized[greedy].argmax(1).tolist()
    assert torch.allclose(got.logprobs, torch.log_softmax(logits, 1).gather(1, got.tokens[:, None])[:, 0])  # raw


def test_logit_bias_forces_a_token():
    V = 300
    p = SamplingParams(logit_bias=((7, 100.0),), temperature=1.0, seed=1)
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(0))
    table = [(p, Sampler(p, V), n, 0) for n in range(4)]
    params = sampling_tensors(table, "cpu")
    params.penalties = penalty_tensors(table, torch.device("cpu"))
    assert sample_batch(logits, params).tokens.tolist() == [7] * 4


def test_prompt_id_bitmap_round_trips_and_rejects_bad_sizes():
    ids = [0, 5, 7, 8, 259, 5]
    data = encode_prompt_ids(ids, 260)
    assert len(data) == 33 and decode_prompt_ids(data, 260) == (0, 5, 7, 8, 259)
    with pytest.raises(ValueError, match="expected 33 bytes"):
        decode_prompt_ids(data + b"\0", 260)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        decode_prompt_ids(b"\0" * 32 + b"\x80", 260)


@pytest.mark.parametrize(("field", "value"), [("frequency_penalty", 2.5), ("presence_penalty", -2.01),
                                              ("repetition_penalty", 0.0), ("repetition_penalty", float("nan")),
                                              ("logit_bias", ((3, 100.5),)), ("logit_bias", ((3, 1.0), (3, 2.0))),
                                              ("logit_bias", ((-1, 1.0),))])
def test_invalid_penalty_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams.checked(**{field: value})


def test_logit_bias_outside_the_vocabulary_is_refused():
    with pytest.raises(ValueError, match=r"logit_bias token ids \[300\]"):
        Sampler(SamplingParams(logit_bias=((300, 1.0),)), 300)
