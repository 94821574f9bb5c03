"""Incremental equals whole: prefill(L) + n × decode gives the logits of prefill(L + n), and any chunking of
a prefill leaves the same state, across every compression boundary of the tiny preset."""

from __future__ import annotations

import pytest
import torch
from helpers import prompt, tiny_model

# tiny: CSA ratio 4, HCA ratio 16, window 16: lengths before, on and after each boundary.
LENGTHS = [1, 3, 4, 5, 15, 16, 17, 31, 32, 33, 63, 64, 65, 100]


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=0)


def _incremental_logits(model, ids: torch.Tensor, prefill_len: int) -> tuple[torch.Tensor, object]:
    logits, state = model.prefill(ids[:prefill_len])
    rows = [logits[-1]]
    for t in ids[prefill_len:-1].tolist():
        rows.append(model.decode(t, state))
    return torch.stack(rows), state


@pytest.mark.parametrize("length", LENGTHS)
def test_prefill_then_decode_equals_whole_prefill_fp32(model, length):
    n = 18  # decode steps: every length crosses at least one more CSA and one HCA/window boundary
    ids = prompt(length + n, seed=length)
    whole, whole_state = model.prefill(ids)
    incremental, state = _incremental_logits(model, ids, length)
    diff = (incremental - whole[length - 1: -1]).abs().max().item()
    assert torch.isfinite(incremental).all()
    assert diff < 1e-4, f"length {length}: max |Δlogit| = {diff}"
    # The incremental state after the last decode is the whole prefill's state minus the last token.
    state_check = model.prefill(ids[:-1])[1]
    assert state.differences(state_check) == []


def test_bf16_incremental_close_to_whole():
    """bf16 weights and activations: decode vs prefill agree to bf16 rounding (max |Δlogit| < 0.05)."""
    model = tiny_model(seed=1, dtype="bfloat16")
    ids = prompt(60, seed=7)
    whole, _ = model.prefill(ids)
    incremental, _ = _incremental_logits(model, ids, 37)
    diff = (incremental - whole[36:-1]).abs().max().item()
    assert torch.isfinite(incremental).all() and diff < 0.05, diff


@pytest.mark.parametrize("seed", range(4))
def test_chunked_prefill_leaves_bit_identical_state(model, seed):
    gen = torch.Generator().manual_seed(100 + seed)
    length = int(torch.randint(40, 140, (1,), generator=gen))
    ids = prompt(length, seed=seed)
    whole_logits, whole_state = model.prefill(ids)
    cuts = sorted(set(torch.randint(1, length, (int(torch.randint(1, 6, (1,), generator=gen)),),
                                    generator=gen).tolist()))
    state, pieces = model.new_state(), []
    for a, b in zip([0, *cuts], [*cuts, length], strict=True):
        pieces.append(model.forward(ids[a:b], state))
    assert state.differences(whole_state) == [], f"cuts {cuts} of {length}"
    assert torch.equal(torch.cat(pieces), whole_logits)


def test_state_is_enumerable_and_copyable(model):
    ids = prompt(50, seed=3)
    _, state = model.prefill(ids)
    names = state.tensors()
    assert "layers.1.indexer.kv" in names and "layers.2.kv_compressed" in names and "layers.0.swa" in names
    assert names["layers.2.kv_compressed"].shape[0] == 50 // 16
    assert names["layers.1.index_keys"].shape[0] == 50 // 4
    copy = state.clone()
    assert copy.differences(state) == []
    a, b = model.decode(5, state), model.decode(5, copy)
    assert torch.equal(a, b)
    copy.layers[0].swa[0, 0] += 1
    assert copy.differences(state) == ["layers.0.swa"]
    assert state.num_bytes() == sum(t.numel() * t.element_size() for t in names.values())


def test_forward_refuses_bad_input(model):
    with pytest.raises(ValueError, match="vocab"):
        model.forward(torch.tensor([0, 260]), model.new_state())
    with pytest.raises(ValueError, match="max_seq_len"):
        model.forward(torch.zeros(1025, dtype=torch.long), model.new_state())


@pytest.mark.parametrize("length", [1, 17, 100])
def test_state_bytes_formula(model, length):
    from sparsepd.model.state import state_bytes

    _, state = model.prefill(prompt(length, seed=1))
    assert state.num_bytes() == state_bytes(model.cfg, length)
