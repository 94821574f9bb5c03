"""CUDA-graph decode (engine/graphs.py): padding is inert, the static buffers carry the fields, and graph
replay equals the eager forward (GPU tests with SPARSEPD_TEST_GPU=1)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from sparsepd.engine.batch import BatchShape, RequestChunk, assemble, build_batch, decode_fields_into, host_fields
from sparsepd.engine.engine import Engine
from sparsepd.engine.graphs import StaticFields, buckets_for, page_width_for
from sparsepd.engine.paged_cache import PagedCache
from sparsepd.engine.pools import PoolConfig, plan_geometry
from sparsepd.engine.sampling import SamplingParams
from sparsepd.model.weights import build_model
from sparsepd.model_config import get_preset

GPU = os.environ.get("SPARSEPD_TEST_GPU") == "1" and torch.cuda.is_available()
gpu_only = pytest.mark.skipif(not GPU, reason="needs a CUDA device and SPARSEPD_TEST_GPU=1")


def _prompts(lengths: list[int], seed: int, vocab: int = 256) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]


def _pool_state(engine: Engine) -> list[torch.Tensor]:
    """Every pool tensor a request reads (the scratch rows are per-forward and excluded)."""
    p, base = engine.pools, engine.pools.geometry.ring_base
    out = [kv[base:].clone() for kv in p.kv]
    out += [t.clone() for t in p.index_cache if t is not None]
    out += [t.clone() for r in (*p.rings, *p.index_rings) if r is not None for t in r]
    return out


def _restore(engine: Engine, state: list[torch.Tensor]) -> None:
    p, base = engine.pools, engine.pools.geometry.ring_base
    targets = [kv[base:] for kv in p.kv] + [t for t in p.index_cache if t is not None]
    targets += [t for r in (*p.rings, *p.index_rings) if r is not None for t in r]
    for t, s in zip(targets, state, strict=True):
        t.copy_(s)


def _prefilled(model, lengths: list[int], device: str = "cpu", **engine_kw) -> tuple[Engine, list]:
    engine = Engine(model, PoolConfig(num_slots=8, max_batch_tokens=128, num_pages=64), **engine_kw)
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    reqs = [engine.submit(p, params) for p in _prompts(lengths, seed=len(lengths))]
    while any(r.prefilling or not r.output_ids for r in reqs):
        engine.step()
    return engine, reqs


def test_buckets_and_page_widths():
    assert buckets_for(32) == (1, 2, 4, 8, 16, 24, 32)
    assert buckets_for(40) == (1, 2, 4, 8, 16, 24, 32, 40)
    assert buckets_for(1) == (1,)
    assert [page_width_for(p, 512) for p in (1, 8, 9, 33, 512)] == [8, 8, 16, 64, 512]
    assert page_width_for(300, 100) == 100


def test_static_fields_carry_every_field_in_one_buffer():
    fields = {"a": torch.arange(5, dtype=torch.int64), "b": torch.arange(12, dtype=torch.int32).view(3, 4) - 6,
              "c": torch.tensor([7], dtype=torch.int32)}
    static = StaticFields(fields, torch.device("cpu"))
    assert static.num_bytes == 48 + 48 + 16  # each field 16-byte aligned
    static.device_buffer.fill_(0xFF)  # poison: every byte must be rewritten by the load
    static.load(fields)
    for name, t in fields.items():
        assert torch.equal(static.fields[name], t), name
    changed = {"a": fields["a"] * 3, "b": -fields["b"], "c": fields["c"] + 1}
    static.load(changed)  # the other host buffer: the views still see the device buffer
    for name, t in changed.items():
        assert torch.equal(static.fields[name], t), name


@pytest.mark.parametrize("preset", ["tiny", "bench"])
def test_numpy_decode_fields_equal_the_torch_builder(preset):
    """The graph path's closed-form numpy builder writes exactly host_fields' padded decode fields, for
    random decode batches: positions on and off every compress boundary, ragged page tables, any slots."""
    cfg = get_preset(preset)
    geometry = plan_geometry(cfg, PoolConfig(num_slots=40, max_batch_tokens=64, num_pages=300), torch.device("cpu"))
    gen = torch.Generator().manual_seed(17)
    for trial in range(12):
        B = int(torch.randint(1, 33, (1,), generator=gen))
        shape = BatchShape(batch=B + int(torch.randint(0, 8, (1,), generator=gen)), pages=16)
        slots = torch.randperm(40, generator=gen)[:B].tolist()
        chunks = []
        for b in range(B):
            pos = int(torch.randint(0, 16 * cfg.page_size - 1, (1,), generator=gen)) if trial % 3 else b * 3
            pages = torch.randint(0, 300, (pos // cfg.page_size + 1,), generator=gen).tolist()
            chunks.append(RequestChunk(slots[b], pos, [int(torch.randint(0, 256, (1,), generator=gen))], pages))
        want = host_fields(chunks, geometry, shape)
        out = {k: np.full(tuple(v.shape), 12345, dtype=v.numpy().dtype) for k, v in want.items()}  # poisoned
        decode_fields_into(chunks, geometry, shape, out)
        for name, t in want.items():
            assert np.array_equal(out[name], t.numpy()), (preset, trial, name)


def test_padded_decode_batch_equals_the_unpadded_one():
    """A decode step padded to a bucket and a wider page table gives the same logits for the real rows and
    leaves the same pool state (padding writes nothing a request reads)."""
    model = build_model(get_preset("tiny"), seed=0)
    engine, reqs = _prefilled(model, [5, 17, 33])
    work = [(r, r.next_tokens(1)) for r in reqs]
    chunks = [RequestChunk(r.slot, r.num_computed, t, r.pages) for r, t in work]
    before = _pool_state(engine)
    eager = engine.runner.forward(work)
    after_eager = _pool_state(engine)
    _restore(engine, before)
    shape = BatchShape(batch=8, pages=max(len(c.page_table) for c in chunks) + 3)
    fields = host_fields(chunks, engine.pools.geometry, shape)
    assert fields["token_ids"].shape == (8,) and fields["page_table"].shape == (8, shape.pages)
    batch = assemble(fields, engine.pools.geometry, chunks)
    cache = PagedCache(batch, engine.pools, engine.runner.rope_tables)
    padded = model.forward_batch(batch.token_ids, batch.positions, cache, ids_checked=True)
    assert padded.shape[0] == 8 and torch.isfinite(padded).all()
    # GEMMs may round differently at another batch size (M): CPU BLAS and cuBLAS pick their blocking by shape, so
    # the real rows (and the KV they write) match the unpadded batch to fp32 rounding, not bit for bit; a pad row
    # that wrote where a request reads would differ by far more
    real = padded[: len(reqs)]
    assert torch.allclose(real, eager, rtol=1e-5, atol=1e-5 * eager.abs().max().item()), (real - eager).abs().max()
    assert torch.equal(real.argmax(-1), eager.argmax(-1))
    for a, b in zip(_pool_state(engine), after_eager, strict=True):
        assert torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-6), (a.float() - b.float()).abs().max()


def test_all_padding_batch_writes_nothing():
    model = build_model(get_preset("tiny"), seed=0)
    engine, _ = _prefilled(model, [9, 40])
    before = _pool_state(engine)
    shape = BatchShape(batch=4, pages=8)
    batch = assemble(host_fields([], engine.pools.geometry, shape), engine.pools.geometry, [])
    out = model.forward_batch(batch.token_ids, batch.positions, PagedCache(batch, engine.pools,
                                                                           engine.runner.rope_tables),
                              ids_checked=True)
    assert out.shape == (4, model.cfg.vocab_size) and torch.isfinite(out).all()
    for a, b in zip(_pool_state(engine), before, strict=True):
        assert torch.equal(a, b)


def test_eager_batch_checks_token_ids_on_the_host():
    model = build_model(get_preset("tiny"), seed=0)
    engine, reqs = _prefilled(model, [6])
    with pytest.raises(ValueError, match="vocabulary"):
        engine.runner.forward([(reqs[0], [model.cfg.vocab_size])])
    build_batch([RequestChunk(reqs[0].slot, reqs[0].num_computed, [3], reqs[0].pages)], engine.pools.geometry, "cpu")


# --- on the GPU ---------------------------------------------------------------------------------------
def _run_mixed(model, cuda_graph: bool, overlap: bool = False) -> tuple[list[list[int]], Engine]:
    """Requests joining and leaving: a few start, more arrive while they decode, lengths differ."""
    engine = Engine(model, PoolConfig(num_slots=16, max_batch_tokens=256, num_pages=128), cuda_graph=cuda_graph,
                    overlap=overlap)
    prompts = _prompts([5, 17, 33, 64, 70, 3, 120, 9, 40, 16], seed=11)
    first = [engine.submit(p, SamplingParams(max_new_tokens=8 + 3 * i, ignore_eos=True))
             for i, p in enumerate(prompts[:4])]
    for _ in range(6):
        engine.step()
    later = [engine.submit(p, SamplingParams(max_new_tokens=5 + 2 * i, ignore_eos=True))
             for i, p in enumerate(prompts[4:])]
    engine.scheduler.run_to_completion()
    assert engine.is_idle_and_empty()
    return [r.output_ids for r in first + later], engine


@gpu_only
def test_graph_decode_tokens_equal_eager_on_gpu():
    """fp32 tiny without the discontinuous steps (FP8 KV, a dropping top-k): graph replay and eager give the
    same greedy tokens for requests that join and leave (batches pad to buckets 1…16)."""
    model = build_model(get_preset("tiny", quantize_kv=False, index_topk=256), seed=0, device="cuda")
    eager, _ = _run_mixed(model, cuda_graph=False)
    graph, engine = _run_mixed(model, cuda_graph=True)
    assert engine.runner.graphs.num_graphs >= 3
    assert engine.runner.forwards["split"] > 0  # prompts that joined decoding requests: replay + eager chunks
    assert graph == eager


@gpu_only
def test_graph_decode_with_overlap_tokens_equal_eager_on_gpu():
    """With overlap every decode input is PENDING: a replayed graph reads it from its slot on the device (the static
    fields' slots, engine/runner.py `_fill_from_fields`) and remembers its tokens through them; the tokens are the
    eager ones."""
    model = build_model(get_preset("tiny", quantize_kv=False, index_topk=256), seed=0, device="cuda")
    eager, _ = _run_mixed(model, cuda_graph=False)
    graph, engine = _run_mixed(model, cuda_graph=True, overlap=True)
    assert engine.runner.graphs.num_graphs >= 3
    assert graph == eager


@gpu_only
@pytest.mark.parametrize("preset", ["tiny", "bench"])
def test_graph_step_logits_equal_eager_on_gpu(preset):
    """One decode step, same state, eager vs replay: fp32 tiny to 1e-4, bf16 bench to 2e-2 relative (the
    padded batch may take other GEMM kernels than the unpadded one; bf16 has 8 bits of mantissa)."""
    cfg = get_preset(preset, max_seq_len=4096) if preset == "bench" else get_preset(preset)
    model = build_model(cfg, seed=0, device="cuda")
    lengths = [5, 130, 300] if preset == "bench" else [5, 17, 33]
    vocab = 256
    for cuda_graph in (False, True):
        engine = Engine(model, PoolConfig(num_slots=8, max_batch_tokens=512, num_pages=32), cuda_graph=cuda_graph)
        params = SamplingParams(max_new_tokens=4, ignore_eos=True)
        reqs = [engine.submit(p, params) for p in _prompts(lengths, seed=5, vocab=vocab)]
        while any(r.prefilling or not r.output_ids for r in reqs):
            engine.step()
        work = [(r, r.next_tokens(1)) for r in reqs]
        logits = engine.runner.forward(work).clone()
        if cuda_graph:
            assert engine.runner.graphs.num_graphs == 1
            graph_logits = logits
        else:
            eager_logits = logits
    assert torch.isfinite(graph_logits).all()
    rel = ((graph_logits - eager_logits).norm() / eager_logits.norm()).item()
    assert rel < (1e-4 if preset == "tiny" else 2e-2), rel
    # Greedy picks: equal wherever the eager top-2 margin exceeds twice the row's largest difference; where it
    # does not (a near tie, seen in bf16 on the H200), the graph's pick is within that distance of the top.
    diff = (graph_logits - eager_logits).abs().amax(-1)
    top2 = eager_logits.topk(2, dim=-1).values
    clear = top2[:, 0] - top2[:, 1] > 2 * diff
    assert torch.equal(graph_logits.argmax(-1)[clear], eager_logits.argmax(-1)[clear])
    picked = eager_logits.gather(-1, graph_logits.argmax(-1, keepdim=True)).squeeze(-1)
    assert bool((top2[:, 0] - picked <= 2 * diff).all()), (top2[:, 0] - picked, diff)
    if preset == "tiny":  # fp32: no near ties at these prompts
        assert bool(clear.all())
