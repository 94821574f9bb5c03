"""The engine's RoPE angles (engine/paged_cache.py `PagedCache.cos_sin`): rows of the runner's tables, equal to
model/numerics.py's rope_cos_sin at the same positions bit for bit, and gathered anew on every call: a captured
graph's positions buffer is rewritten in place between replays, and a value kept from an earlier call (the warm-up
before the capture) would be replayed stale."""

from __future__ import annotations

import torch

from sparsepd.engine.engine import Engine
from sparsepd.engine.paged_cache import PagedCache
from sparsepd.engine.pools import PoolConfig
from sparsepd.model.numerics import rope_cos_sin
from sparsepd.model.weights import build_model
from sparsepd.model_config import get_preset


def test_gathered_angles_equal_computed_ones_and_follow_the_positions_buffer():
    cfg = get_preset("tiny")
    model = build_model(cfg, seed=0)
    engine = Engine(model, PoolConfig(num_slots=2, max_batch_tokens=32, num_pages=8))
    freq_sets = {id(layer.attn.freqs): layer.attn.freqs for layer in model.layers}
    assert len(freq_sets) == 2  # the compressed layers' (compress_rope_theta, YaRN) and the plain ones'
    gen = torch.Generator().manual_seed(0)
    positions = torch.cat([torch.tensor([0, cfg.max_seq_len - 1]),
                           torch.randint(0, cfg.max_seq_len, (29,), generator=gen)])
    cache = PagedCache(None, engine.pools, engine.runner.rope_tables)
    for freqs in freq_sets.values():
        cos, sin = cache.cos_sin(positions, freqs)
        want_cos, want_sin = rope_cos_sin(positions, freqs)
        assert cos.dtype == torch.float32 and torch.equal(cos, want_cos) and torch.equal(sin, want_sin)
    # the same buffer rewritten in place, as a graph's static fields are before a replay: the new positions' angles
    before = positions.clone()
    positions.copy_(torch.randint(0, cfg.max_seq_len, positions.shape, generator=gen))
    assert not torch.equal(before, positions)
    for freqs in freq_sets.values():
        cos, sin = cache.cos_sin(positions, freqs)
        want_cos, want_sin = rope_cos_sin(positions, freqs)
        assert torch.equal(cos, want_cos) and torch.equal(sin, want_sin)
