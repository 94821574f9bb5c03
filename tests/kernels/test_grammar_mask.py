"""The grammar's token bitmask on the logits (kernels/sampling.py): `apply_token_bitmask` equals the id-by-id
reference and xgrammar's own `apply_token_bitmask_inplace`, masked ids are −inf and the others unchanged bit
for bit; the draw never picks a masked id, and when the grammar allows only banned ids the grammar wins (no
row is ever all −inf, so no NaN)."""

from __future__ import annotations

import pytest
import torch

from sparsepd.kernels.sampling import (
    SamplingTensors,
    _mask,
    apply_token_bitmask,
    apply_token_bitmask_ref,
    sample_batch,
    sample_batch_ref,
    unpack_token_bitmask,
)

SHAPES = [(1, 1), (3, 17), (2, 32), (4, 33), (3, 260), (2, 1823)]


def _random_mask(B: int, V: int, gen: torch.Generator, density: float = 0.3) -> torch.Tensor:
    """[B, ⌈V/32⌉] int32 with about `density` of the ids allowed, at least one per row, garbage bits past V."""
    allowed = torch.rand((B, V), generator=gen) < density
    allowed[torch.arange(B), torch.randint(0, V, (B,), generator=gen)] = True
    words = (V + 31) // 32
    bits = torch.zeros((B, words * 32), dtype=torch.int64)
    bits[:, :V] = allowed.long()
    bits[:, V:] = torch.randint(0, 2, (B, words * 32 - V), generator=gen)  # must be ignored
    packed = (bits.reshape(B, words, 32) << torch.arange(32)).sum(-1)  # [B, W] in [0, 2**32)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


@pytest.mark.parametrize("B,V", SHAPES)
def test_bitmask_application_equals_the_references(B, V):
    gen = torch.Generator().manual_seed(B * 1000 + V)
    logits = torch.randn((B, V), generator=gen) * 5
    logits[0, 0] = float("nan")  # a NaN under the mask must become −inf; one that is allowed stays
    mask = _random_mask(B, V, gen)
    got = apply_token_bitmask(logits, mask)
    want = apply_token_bitmask_ref(logits, mask)
    allowed = unpack_token_bitmask(mask, V)
    assert torch.equal(got.isnan(), want.isnan()), f"B={B} V={V}"
    assert torch.equal(torch.nan_to_num(got, nan=7.0), torch.nan_to_num(want, nan=7.0)), f"B={B} V={V}"
    assert bool(torch.isneginf(got[~allowed]).all()), f"B={B} V={V}: a masked id is not −inf"
    kept = logits[allowed]
    assert torch.equal(torch.nan_to_num(got[allowed], nan=7.0), torch.nan_to_num(kept, nan=7.0))
    assert got.isnan().sum() == int(bool(allowed[0, 0]))  # NaN passes only where it was allowed
    xgr = pytest.importorskip("xgrammar")
    theirs = logits.clone()
    xgr.apply_token_bitmask_inplace(theirs, mask)
    assert torch.equal(torch.nan_to_num(got, nan=7.0), torch.nan_to_num(theirs, nan=7.0)), f"B={B} V={V}"


def test_bitmask_shape_is_checked():
    with pytest.raises(ValueError, match=r"expected int32 \[2, 2\]"):
        apply_token_bitmask(torch.zeros(2, 40), torch.zeros(2, 3, dtype=torch.int32))


def _params(B: int, V: int, temperature: list[float], ban: list[list[int]], mask: torch.Tensor) -> SamplingTensors:
    width = max(1, *(len(b) for b in ban))
    return SamplingTensors(
        temperature=torch.tensor(temperature), top_k=torch.full((B,), -1, dtype=torch.int32),
        top_p=torch.ones(B), min_p=torch.zeros(B), seed=torch.arange(B, dtype=torch.int64) + 11,
        counter=torch.zeros(B, dtype=torch.int64),
        ban_ids=torch.tensor([b + [-1] * (width - len(b)) for b in ban], dtype=torch.int64), token_bitmask=mask,
        all_greedy=all(t == 0.0 for t in temperature))


@pytest.mark.parametrize("V", [33, 260])
def test_draws_stay_inside_the_mask_and_the_grammar_wins_over_bans(V):
    gen = torch.Generator().manual_seed(V)
    B = 4
    logits = torch.randn((B, V), generator=gen) * 3
    mask = _random_mask(B, V, gen, density=0.1)
    allowed = [unpack_token_bitmask(mask, V)[b].nonzero().flatten().tolist() for b in range(B)]
    # rows 0, 2: a ban on every id the grammar allows (the grammar wins); rows 1, 3: a ban on one allowed id
    ban = [allowed[0], allowed[1][:1] if len(allowed[1]) > 1 else [], allowed[2], [allowed[3][0], V - 1]]
    for temperature in ([0.0] * B, [0.0, 0.7, 1.3, 0.9]):
        params = _params(B, V, temperature, ban, mask)
        masked = _mask(logits, params)
        assert not bool(torch.isneginf(masked).all(dim=1).any()), "a row was left with nothing"
        assert not bool(torch.softmax(masked, dim=1).isnan().any())
        for b in range(B):
            finite = torch.isfinite(masked[b]).nonzero().flatten().tolist()
            want = allowed[b] if b in (0, 2) else sorted(set(allowed[b]) - set(ban[b]))
            assert finite == want, f"row {b}: {finite} vs {want}"
        got = sample_batch(logits, params).tokens.tolist()
        ref = sample_batch_ref(logits, params).tokens.tolist()
        assert got == ref, f"temperature {temperature}: {got} vs {ref}"
        for b, token in enumerate(got):
            assert token in allowed[b] and (b in (0, 2) or token not in ban[b]), f"row {b} drew {token}"
