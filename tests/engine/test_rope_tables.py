"""The engine's RoPE angles (engine/paged_cache.py `PagedCache.cos_sin`): rows of the runner's tables, gathered once
a forward per frequency set, equal to model/numerics.py's rope_cos_sin at the same positions bit for bit."""

from __future__ import annotations

import torch

from sparsepd.engine.engine import Engine
from sparsepd.engine.paged_cache import PagedCache
from sparsepd.engine.pools import PoolConfig
from sparsepd.model.numerics import rope_cos_sin
from sparsepd.model.weights import build_model
from sparsepd.model_config import get_preset


def test_gathered_angles_equal_computed_ones_and_are_shared_by_the_layers():
    cfg = get_preset("tiny")
    model = build_model(cfg, seed=0)
    engine = Engine(model, PoolConfig(num_slots=2, max_batch_tokens=32, num_pages=8))
    attns = [layer.attn for layer in model.layers]
    freq_sets = {id(a.freqs): a.freqs for a in attns}
    assert len(freq_sets) == 2  # the compressed layers' (compress_rope_theta, YaRN) and the plain ones'
    gen = torch.Generator().manual_seed(0)
    positions = torch.cat([torch.tensor([0, cfg.max_seq_len - 1]),
                           torch.randint(0, cfg.max_seq_len, (29,), generator=gen)])
    cache = PagedCache(None, engine.pools, engine.runner.rope_tables)
    for freqs in freq_sets.values():
        cos, sin = cache.cos_sin(positions, freqs)
        want_cos, want_sin = rope_cos_sin(positions, freqs)
        assert cos.dtype == torch.float32 and torch.equal(cos, want_cos) and torch.equal(sin, want_sin)
        again = cache.cos_sin(positions, freqs)  # the next layer of the same forward: the same tensors
        assert again[0] is cos and again[1] is sin
    other = positions[:5].clone()  # the next forward's positions: gathered anew
    cos, sin = cache.cos_sin(other, attns[0].freqs)
    assert torch.equal(cos, rope_cos_sin(other, attns[0].freqs)[0]) and cos.shape[0] == 5
