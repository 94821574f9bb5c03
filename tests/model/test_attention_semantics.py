"""The indexer really selects, and the attention sink behaves as docs/dsv4-spec.md says."""

from __future__ import annotations

import torch
from helpers import prompt, tiny_model

from sparsepd.kernels.topk import topk_visible


def test_indexer_drops_entries_and_changes_the_result():
    sparse = tiny_model(seed=2)
    ids = prompt(100, seed=11)
    from sparsepd.model import request_cache

    calls = []
    real = request_cache.indexer_topk

    def spy(*args):
        calls.append(real(*args))
        return calls[-1]

    request_cache.indexer_topk = spy
    try:
        sparse_logits, state = sparse.prefill(ids)
    finally:
        request_cache.indexer_topk = real
    top = calls[0]  # [100, topk] of the first CSA layer
    assert top.shape == (100, 4)
    last = top[-1]
    assert (last >= 0).all() and len(set(last.tolist())) == 4
    assert state.layers[1].index_keys.shape[0] == 25  # 25 committed entries, 4 chosen: 21 dropped

    # Dense: top-k at least the number of entries, everything else identical (same seed, same weights).
    dense = tiny_model(seed=2, index_topk=256)
    dense_logits, _ = dense.prefill(ids)
    assert (sparse_logits - dense_logits).abs().max() > 1e-3


def test_topk_visible_matches_brute_force():
    gen = torch.Generator().manual_seed(5)
    scores = torch.randn(7, 30, generator=gen)
    visible = torch.tensor([0, 1, 3, 4, 5, 17, 30])
    got = topk_visible(scores, visible.to(torch.int32), 4)
    for t in range(7):
        v = int(visible[t])
        want = sorted(range(v), key=lambda e: -float(scores[t, e]))[:4]
        assert got[t].tolist() == want + [-1] * (4 - len(want))


def _attention_contributes_nothing(model):
    for layer in model.layers:
        attn = layer.attn
        original = attn.forward

        def zero(x, positions, cache, layer_id, _orig=original):
            return torch.zeros_like(_orig(x, positions, cache, layer_id))

        attn.forward = zero


def test_huge_sink_zeroes_attention_output():
    ids = prompt(40, seed=4)
    model = tiny_model(seed=3)
    for layer in model.layers:
        layer.attn.attn_sink.fill_(1e4)
    sunk, _ = model.prefill(ids)
    reference = tiny_model(seed=3)
    _attention_contributes_nothing(reference)
    without, _ = reference.prefill(ids)
    assert torch.allclose(sunk, without, atol=1e-5), (sunk - without).abs().max()
    assert (sunk - tiny_model(seed=3).prefill(ids)[0]).abs().max() > 1e-2  # the sink mattered


def test_minus_infinite_sink_is_plain_softmax():
    """With sink −inf the layer's attention equals softmax attention over the same keys."""
    model = tiny_model(seed=3)
    attn = model.layers[0].attn
    attn.attn_sink.fill_(float("-inf"))
    captured = {}
    from sparsepd.model import request_cache as attention_module

    real = attention_module.sparse_attn_ref

    def spy(q, kv, indices, sink, scale):
        out = real(q, kv, indices, sink, scale)
        if not captured:  # the first call is layer 0, whose sink is −inf
            captured.update(q=q, kv=kv, indices=indices, out=out[0], scale=scale)
        return out

    attention_module.sparse_attn_ref = spy
    try:
        model.prefill(prompt(30, seed=9))
    finally:
        attention_module.sparse_attn_ref = real
    q, kv, idx = captured["q"].double(), captured["kv"].double(), captured["indices"].long()
    rows = kv[idx.clamp(min=0)]  # [T, K, D]
    s = torch.einsum("thd,tkd->thk", q, rows) * captured["scale"]
    s = s.masked_fill((idx < 0)[:, None, :], float("-inf"))
    want = torch.einsum("thk,tkd->thd", s.softmax(-1), rows)
    assert torch.allclose(captured["out"].double(), want, atol=1e-5)


def test_reference_fp4_indexer_simulation_runs_and_differs():
    """indexer_quant="fp4" reproduces the published reference's simulation instead of the FP8 cache."""
    ids = prompt(60, seed=8)
    fp8_logits, _ = tiny_model(seed=2).prefill(ids)
    fp4 = tiny_model(seed=2, indexer_quant="fp4")
    fp4_logits, state = fp4.prefill(ids)
    assert state.layers[1].index_keys.dtype == torch.float32 and torch.isfinite(fp4_logits).all()
    incremental = fp4.prefill(ids[:40])[1]
    for t in ids[40:].tolist():
        fp4.decode(t, incremental)
    assert incremental.differences(state) == []
    assert not torch.equal(fp8_logits, fp4_logits)
