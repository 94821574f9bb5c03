"""Prompt chunks from fixed-shape steps (engine/prefill_graphs.py) on the CPU: the static-shape path (the one CUDA
graphs replay, here run eagerly from the same static buffers: `graph_capture=False`) gives the tokens of the eager
engine for prompts of every length around the tiny preset's boundaries, arriving while others decode (steps of
decode tokens and prompt chunks together, with and without overlap), and leaves what does not fit a shape (boundary
snapshots, long chunks, many chunks) to the eager path."""

from __future__ import annotations

import os

import pytest
import torch

from sparsepd.engine.batch import BatchShape, RequestChunk
from sparsepd.engine.engine import Engine
from sparsepd.engine.pools import PoolConfig
from sparsepd.engine.prefill_graphs import PrefillGraphs
from sparsepd.engine.sampling import SamplingParams
from sparsepd.model.weights import build_model
from sparsepd.model_config import get_preset

LENGTHS = [1, 5, 16, 17, 33, 47, 64, 70]  # around tiny's boundaries (ratio 4, HCA 16, window 16, page 16)
TOKENS = (16, 32, 64)  # tokens per chunk of the test's shapes (the engine's default starts at 64)


@pytest.fixture(scope="module")
def tiny():
    return build_model(get_preset("tiny"), seed=0)


def _prompts(seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=gen).tolist() for n in LENGTHS]


def _engine(model, prefill_graph: bool, overlap: bool, entries: int = 0) -> Engine:
    pool = PoolConfig(num_slots=8, max_batch_tokens=96, num_pages=96, prefix_cache_entries=entries)
    engine = Engine(model, pool, overlap=overlap, prefill_graph=prefill_graph, graph_capture=False)
    if prefill_graph:
        engine.runner.prefill_graphs = PrefillGraphs(model, engine.pools, engine.runner.rope_tables, capture=False,
                                                     tokens=TOKENS)
    return engine


def _run(engine: Engine, prompts: list[list[int]]) -> list[list[int]]:
    """Two prompts start; the rest arrive one a step while those decode (steps of decode tokens and a chunk)."""
    first = [engine.submit(p, SamplingParams(max_new_tokens=12, ignore_eos=True)) for p in prompts[:2]]
    later = []
    for i, p in enumerate(prompts[2:]):
        engine.step()
        later.append(engine.submit(p, SamplingParams(max_new_tokens=4 + i, ignore_eos=True)))
    engine.scheduler.run_to_completion()
    assert engine.is_idle_and_empty()
    return [r.output_ids for r in first + later]


@pytest.mark.parametrize("overlap", [False, True])
def test_prefill_graph_tokens_equal_eager(tiny, overlap):
    for seed in (1, 2):
        prompts = _prompts(seed)
        eager = _run(_engine(tiny, False, overlap), prompts)
        engine = _engine(tiny, True, overlap)
        static = _run(engine, prompts)
        assert static == eager
        assert engine.runner.forwards["prefill_graph"] >= 4, engine.runner.forwards
        assert engine.runner.prefill_graphs.steps.runs == engine.runner.forwards["prefill_graph"]


def test_prefill_graph_with_the_prefix_cache_equals_eager(tiny):
    """Chunks that take a boundary snapshot run eagerly; the rest replay; the tokens are the eager engine's, also
    for a second round of the same prompts (restored from the cache)."""
    prompts = _prompts(3)
    outs = []
    for prefill_graph in (False, True):
        engine = _engine(tiny, prefill_graph, overlap=True, entries=16)
        outs.append(_run(engine, prompts) + _run(engine, prompts))
        if prefill_graph:
            assert engine.runner.forwards["prefill_graph"] > 0 and engine.runner.forwards["eager"] > 0
    assert outs[0] == outs[1]


def test_prefill_graph_shapes(tiny):
    engine = _engine(tiny, True, overlap=False)
    graphs = engine.runner.prefill_graphs
    pages = list(range(3))

    def chunk(n: int, captures=()) -> RequestChunk:
        return RequestChunk(0, 0, [1] * n, pages, captures)

    assert graphs.shape_for([chunk(5)]) == BatchShape(1, 8, 16)
    assert graphs.shape_for([chunk(17), chunk(3)]) == BatchShape(2, 8, 32)
    assert graphs.shape_for([chunk(9), chunk(3), chunk(1)]) == BatchShape(4, 8, 16)
    assert graphs.shape_for([chunk(17), chunk(3), chunk(1)]) is None  # 4 × 32 rows > max_batch_tokens (96)
    assert graphs.shape_for([chunk(64)]) == BatchShape(1, 8, 64)
    assert graphs.shape_for([chunk(65)]) is None  # longer than the largest tokens per chunk
    assert graphs.shape_for([chunk(40), chunk(40)]) is None  # 2 × 64 rows > max_batch_tokens (96)
    assert graphs.shape_for([chunk(2)] * 9) is None  # more chunks than the largest bucket
    assert graphs.shape_for([chunk(5, captures=((16, 8),))]) is None  # a boundary snapshot: eager
    assert graphs.shape_for([]) is None


GPU = os.environ.get("SPARSEPD_TEST_GPU") == "1" and torch.cuda.is_available()


@pytest.mark.skipif(not GPU, reason="needs a CUDA device and SPARSEPD_TEST_GPU=1")
@pytest.mark.parametrize("overlap", [False, True])
def test_prefill_graph_replay_tokens_equal_eager_on_gpu(overlap):
    """Captured and replayed (beside the decode graphs: a step of decode tokens and a prompt chunk replays both):
    fp32 tiny without the discontinuous steps (FP8 KV, a dropping top-k) gives the eager engine's tokens."""
    model = build_model(get_preset("tiny", quantize_kv=False, index_topk=256), seed=0, device="cuda")
    pool = PoolConfig(num_slots=8, max_batch_tokens=256, num_pages=96)
    outs, engines = [], []
    for graphs in (False, True):
        engine = Engine(model, pool, cuda_graph=graphs, overlap=overlap, prefill_graph=graphs)
        outs.append(_run(engine, _prompts(4)))
        engines.append(engine)
    forwards = engines[1].runner.forwards
    assert engines[1].runner.prefill_graphs.steps.num_graphs >= 2
    assert forwards["prefill_graph"] > 0 and forwards["split"] > 0, forwards
    assert outs[1] == outs[0]


class EagerDecodeGraphs:
    """A stand-in for engine/graphs.py `DecodeGraphs` on the CPU: the same choice of steps (`decode_shape`) and the
    same `run` contract (the loaded fields handed to `before_replay`, logits of the chunks' rows), computed by an
    eager forward of just those chunks. Lets the CPU test the runner's split of a mixed step."""

    def __init__(self, runner):
        self.runner, self.runs = runner, 0

    def shape_for(self, chunks):
        from sparsepd.engine.graphs import decode_shape
        return decode_shape(chunks, (1, 2, 4, 8), 64)

    def run(self, chunks, shape, before_replay=None):
        from sparsepd.engine.batch import build_batch
        from sparsepd.engine.paged_cache import PagedCache
        runner = self.runner
        batch = build_batch(chunks, runner.pools.geometry, runner.pools.device)
        if before_replay is not None:
            before_replay({"token_ids": batch.token_ids, "slots": batch.slots})
        self.runs += 1
        cache = PagedCache(batch, runner.pools, runner.rope_tables)
        return runner.model.forward_batch(batch.token_ids, batch.positions, cache, logit_rows=batch.last_rows,
                                          ids_checked=True)


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("prefill_graph", [False, True])
def test_split_mixed_step_tokens_equal_eager(tiny, overlap, prefill_graph):
    """A step of decode tokens and prompt chunks runs as two forwards (decode tokens through their graph, the chunks
    eagerly or from a prefill graph: engine/runner.py `_split_mixed`); the tokens are the one-forward engine's."""
    prompts = _prompts(5)
    eager = _run(_engine(tiny, False, overlap), prompts)
    engine = _engine(tiny, prefill_graph, overlap)
    engine.runner.graphs = EagerDecodeGraphs(engine.runner)
    assert _run(engine, prompts) == eager
    forwards = engine.runner.forwards
    assert forwards["split"] >= 3 and forwards["graph"] > 0, forwards
    assert engine.runner.graphs.runs == forwards["split"] + forwards["graph"]
    if prefill_graph:  # the chunks beside a decode replay replayed too, and counted as prompt-chunk replays
        assert forwards["prefill_graph"] == engine.runner.prefill_graphs.steps.runs > 0, forwards
