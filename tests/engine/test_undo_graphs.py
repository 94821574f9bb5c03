"""The undo log at a fixed shape (engine/undo_graphs.py) leaves the pools exactly as `UndoLog` (engine/undo.py)
does: random spans over random pool contents, the forward's writes stood in for by noise over every pool tensor,
then restores that keep every position, none, or a random part of each span. Eagerly on the CPU (the bodies a
graph holds); captured and replayed on a CUDA device (SPARSEPD_TEST_GPU=1)."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from sparsepd.engine.drafter import OracleDrafter
from sparsepd.engine.engine import Engine
from sparsepd.engine.pools import KVPools, PoolConfig, plan_geometry
from sparsepd.engine.sampling import SamplingParams
from sparsepd.engine.undo import Span, UndoLog, undo_targets
from sparsepd.engine.undo_graphs import UndoGraphs, kind_capacity
from sparsepd.model.weight_memory import gb
from sparsepd.model.weights import build_model
from sparsepd.model_config import get_preset

GPU = os.environ.get("SPARSEPD_TEST_GPU") == "1" and torch.cuda.is_available()
K = 3
BUCKETS = (1, 2, 4, 8)


def _pools(device: str) -> KVPools:
    cfg = get_preset("tiny")
    geometry = plan_geometry(cfg, PoolConfig(num_slots=8, max_batch_tokens=64, num_pages=96), torch.device(device))
    return KVPools(cfg, geometry, device)


def _tensors(pools: KVPools) -> list[torch.Tensor]:
    return [t for t, _ in undo_targets(pools)]


def _fill(pools: KVPools, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for t in _tensors(pools):
        t.copy_((torch.randn(t.shape, generator=gen) * 8).to(t.dtype))


def _spans(rng: random.Random, n: int, page_size: int) -> list[Span]:
    slots = rng.sample(range(8), n)
    pages = rng.sample(range(96), 96)
    spans = []
    for i, slot in enumerate(slots):
        first = rng.randrange(0, 150)
        last = first + rng.randint(1, K)
        need = (last - 1) // page_size + 1
        spans.append(Span(slot, pages[i * 12: i * 12 + need], first, last))
    return spans


def _kept(rng: random.Random, spans: list[Span], how: str) -> list[int]:
    if how == "all":
        return [s.last for s in spans]
    if how == "none":
        return [s.first for s in spans]
    return [rng.randint(s.first, s.last) for s in spans]


def _run(device: str, capture: bool, seed: int):
    rng = random.Random(seed)
    a, b = _pools(device), _pools(device)
    graphs = UndoGraphs(b, undo_targets(b), K, BUCKETS, capture)
    restored_any = False
    for round_ in range(12):
        n = rng.choice([1, 2, 3, 5, 8])
        spans = _spans(rng, n, a.geometry.page_size)
        how = ["all", "none", "part"][round_ % 3]
        kept = _kept(rng, spans, how)
        for pools in (a, b):
            _fill(pools, seed * 100 + round_)
        before = [t.clone() for t in _tensors(a)]
        log_a = UndoLog(a, spans, undo_targets(a))
        log_b = graphs.log(spans)
        assert log_b is not None
        for pools in (a, b):  # the forward's writes: noise over everything
            _fill(pools, seed * 100 + round_ + 50)
        noisy = [t.clone() for t in _tensors(a)]
        count_a, count_b = log_a.restore(kept), log_b.restore(kept)
        assert count_a == count_b, (how, count_a, count_b)
        for i, (x, y) in enumerate(zip(_tensors(a), _tensors(b), strict=True)):
            assert torch.equal(x.cpu(), y.cpu()), f"round {round_} ({how}, {n} spans): pool tensor {i} differs"
        changed = any(not torch.equal(x, z) for x, z in zip(_tensors(a), noisy, strict=True))
        assert changed == (count_a > 0)
        if how == "all":
            assert count_a == 0
        if how == "none":  # every span's window rows hold their values from before the forward again
            assert count_a > 0
            for (x, kind), w in zip(undo_targets(b), before, strict=True):
                if kind.name == "swa":
                    rows = [s.slot * kind.n1 + p % kind.n1 for s in spans for p in range(s.first, s.last)]
                    assert torch.equal(x[rows].cpu(), w[rows].cpu())
        restored_any |= count_a > 0
    assert restored_any
    assert graphs.runs == 12
    return graphs


def test_undo_graphs_restore_what_the_undo_log_restores():
    for seed in range(3):
        _run("cpu", capture=False, seed=seed)


def test_spans_past_a_bucket_or_longer_than_k_are_left_to_the_undo_log():
    pools = _pools("cpu")
    graphs = UndoGraphs(pools, undo_targets(pools), K, BUCKETS, capture=False)
    assert graphs.log([]) is None
    assert graphs.log([Span(0, [0, 1], 0, K + 1)]) is None
    assert graphs.log([Span(i, [i], 0, 1) for i in range(9)]) is None
    assert graphs.log([Span(i, [i], 0, 1) for i in range(8)]) is not None
    capped = UndoGraphs(pools, undo_targets(pools), K, BUCKETS, capture=False, max_spans=4)
    assert capped.buckets == (1, 2, 4) and capped.log([Span(i, [i], 0, 1) for i in range(5)]) is None
    assert capped.log([Span(i, [i], 0, 1) for i in range(3)]) is not None
    rows = [a.shape[0] for a, _ in capped.scratch()]  # the largest bucket's rows, shared by the smaller ones
    assert rows == [kind_capacity(kind, 4, K) * kind.copies for _, kind in undo_targets(pools)]
    assert capped.scratch_bytes == capped.planned_bytes() > 0


def test_rows_of_a_block_end_are_restored_in_their_page():
    """A span whose positions complete a compressed block (ratio 4 at position 3): the committed rows of that
    entry go back too, in the span's page, and only there."""
    pools = _pools("cpu")
    graphs = UndoGraphs(pools, undo_targets(pools), K, BUCKETS, capture=False)
    commit = [(t, kind) for t, kind in undo_targets(pools) if kind.name == "commit" and kind.ratio == 4]
    assert commit
    _fill(pools, 1)
    before = [t.clone() for t, _ in commit]
    log = graphs.log([Span(2, [7], 1, 4)])  # positions 1, 2, 3: 3 completes entry 0 of page 7
    for t, _ in commit:
        t.add_(1)
    log.restore([1])
    for (t, kind), old in zip(commit, before, strict=True):
        row = 7 * kind.n1 + 0
        assert torch.equal(t[row], old[row])
        others = torch.ones(t.shape[0], dtype=torch.bool)
        others[row] = False
        assert torch.equal(t[others], old[others] + 1)


@pytest.mark.skipif(not GPU, reason="needs a CUDA device and SPARSEPD_TEST_GPU=1")
def test_undo_graphs_captured_on_the_gpu_restore_what_the_undo_log_restores():
    graphs = _run("cuda", capture=True, seed=7)
    assert graphs._steps and all(s.save_graph is not None for s in graphs._steps.values())


def test_padding_flags_follow_the_first_row():
    """The static index of a kind repeats its first row past the real ones, with that row's flag (module doc)."""
    pools = _pools("cpu")
    graphs = UndoGraphs(pools, undo_targets(pools), K, BUCKETS, capture=False)
    log = graphs.log([Span(1, [3], 5, 7), Span(4, [9], 9, 10)])  # 3 positions, bucket 2: 6 ring rows a kind
    step = log.step
    ring = next(i for i, k in enumerate(step.kinds) if k.name == "swa")
    index = step.index.fields[f"k{ring}"].numpy()
    kind = step.kinds[ring]
    assert index.tolist() == [1 * kind.n1 + 5 % kind.n1, 1 * kind.n1 + 6 % kind.n1, 4 * kind.n1 + 9 % kind.n1] + \
        [1 * kind.n1 + 5 % kind.n1] * 3
    log.restore([6, 10])  # the first span's position 6 rejected, position 5 kept
    flags = step.flags.fields[f"k{ring}"].numpy()
    assert flags.tolist() == [False, True, False, False, False, False]
    assert np.count_nonzero(flags) == 1


def test_the_memory_plan_counts_the_undo_buffers_the_first_verification_makes():
    model = build_model(get_preset("tiny"), seed=0)
    prompt = list(range(1, 20))
    refs = {"r": [r.output_ids for r in Engine(model, PoolConfig(num_slots=4, max_batch_tokens=64, num_pages=32))
                  .generate([prompt], SamplingParams(max_new_tokens=12, ignore_eos=True))][0]}
    engine = Engine(model, PoolConfig(num_slots=4, max_batch_tokens=64, num_pages=32), cuda_graph=True,
                    graph_capture=False, speculative_num_steps=K, drafter=OracleDrafter(refs, 1.0, 256))
    undo = engine.scheduler._undo_graphs
    line = next(x for x in engine.memory_plan().splitlines() if "speculative undo buffers" in x)
    assert undo.scratch_bytes == 0 and gb(undo.planned_bytes()) in line
    engine.submit(prompt, SamplingParams(max_new_tokens=12, ignore_eos=True), request_id="r")
    engine.scheduler.run_to_completion()
    assert undo.runs > 0 and undo.scratch_bytes == undo.planned_bytes()
    assert "speculative undo buffers" not in Engine(model, PoolConfig(num_slots=4, max_batch_tokens=64,
                                                                     num_pages=32)).memory_plan()
