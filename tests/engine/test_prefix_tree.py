"""The prefix cache's radix tree (engine/prefix_cache.py): any page-aligned prefix an earlier request computed
is restored — part of its prompt or the whole — and a restored request gives the tokens and log-probabilities of
a cold prefill, for branches and continuations, whatever the chunking that took the boundary's snapshot (inside
a chunk, at its end, with the rows before the chunk copied in); snapshots are taken without cutting a chunk or
adding a forward; under snapshot and page pressure the least recently used go, every leaf keeps a snapshot and
the pools come back to full; an aborted prefill leaves only snapshots it completed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from sparsepd.engine.engine import Engine
from sparsepd.engine.pools import PoolConfig, bytes_per_snapshot
from sparsepd.engine.sampling import SamplingParams
from sparsepd.kernels.device import triton_interpreting
from sparsepd.model.weights import build_model
from sparsepd.model_config import get_preset

sys.path.insert(0, str(Path(__file__).parent))
from prefix_cases import ids as _ids  # noqa: E402
from prefix_cases import run_to_length  # noqa: E402
from prefix_cases import same_as_cold as _same  # noqa: E402

CFG = get_preset("tiny")  # page 16 tokens = 4 CSA blocks = 1 HCA block = the window
PAGE = CFG.page_size
PARAMS = SamplingParams(max_new_tokens=4, ignore_eos=True, logprobs=True, top_logprobs=4)


@pytest.fixture(scope="module")
def model():
    return build_model(CFG, seed=0)


def _engine(model, entries: int, num_pages: int = 128, max_batch_tokens: int = 512, num_slots: int = 4,
            host_bytes: int = 0) -> Engine:
    return Engine(model, PoolConfig(num_slots=num_slots, max_batch_tokens=max_batch_tokens, num_pages=num_pages,
                                    prefix_cache_entries=entries, prefix_cache_host_bytes=host_bytes))


@pytest.fixture(scope="module")
def cold(model):
    engine = _engine(model, entries=0)

    def run(prompt, params=PARAMS):
        return _run(engine, prompt, params)
    return run


def _run(engine: Engine, prompt: list[int], params: SamplingParams = PARAMS):
    return run_to_length(engine, prompt, params)


def _count_forwards(engine: Engine) -> list[list[int]]:
    """The chunk lengths of every forward the engine runs from now on."""
    calls, forward = [], engine.runner.forward

    def counted(work, final_rows=None):
        calls.append([len(tokens) for _, tokens in work])
        return forward(work, final_rows)
    engine.runner.forward = counted
    return calls


def _check_tree(engine: Engine) -> None:
    """Every leaf holds a snapshot; the tree holds one reference to each of its nodes' device pages, and a node
    whose page is on the host has only such children; store entries in use are exactly the device snapshots', no
    capture slot is held between steps, and the host tier's bytes are its items'."""
    cache = engine.prefix_cache
    for node in cache.nodes.values():
        assert node.children or node.restorable
        assert node.parent.children[node.key] is node
        assert (node.page >= 0) != (node.host_page is not None)
        if node.page >= 0:
            assert engine.pools.pages.refs(node.page) >= 1
        else:
            assert all(c.page < 0 for c in node.children.values())
    used = sorted(n.snapshot for n in cache.lru.values())
    assert used == sorted(set(range(cache.max_entries)) - set(cache.free_entries))
    assert engine.pools.snapshots.num_used == 0
    assert cache.host_used == cache.num_host_snapshots * cache.snapshot_bytes + cache.num_host_pages * cache.page_bytes


# (shared prefix, A's own tail, B's own tail, the worker's token budget): B's hit is the shared prefix rounded down
# to the page; the budgets put A's boundaries inside chunks (512), at chunk ends (16, 48) and after chunk starts
# that are not page-aligned (the rows before the chunk come from the request's slot: 40, 7).
AB_CASES = [(400, 40, 40, 512), (37, 20, 9, 512), (100, 3, 30, 40), (64, 10, 1, 16), (90, 26, 26, 7),
            (130, 10, 35, 48), (33, 1, 14, 512)]


@pytest.mark.parametrize("shared,tail_a,tail_b,budget", AB_CASES)
def test_any_shared_page_aligned_prefix_hits_and_equals_a_cold_prefill(model, cold, shared, tail_a, tail_b, budget):
    prefix = _ids(shared, seed=shared)
    a = prefix + _ids(tail_a, seed=1000 + tail_a)
    b = prefix + _ids(tail_b, seed=2000 + tail_b)
    assert a[shared] != b[shared]
    warm = _engine(model, entries=64, max_batch_tokens=budget)
    _same(_run(warm, a), cold(a))
    got = _run(warm, b)
    _same(got, cold(b))
    assert got.cached_tokens == shared // PAGE * PAGE
    stats = warm.prefix_cache.stats
    assert stats.hits == 1 and stats.hit_tokens == got.cached_tokens
    assert stats.miss_tokens == len(a) + len(b) - got.cached_tokens
    _check_tree(warm)
    assert warm.is_idle_and_empty()
    warm.prefix_cache.clear()
    assert warm.pools.pages.num_used == 0 and warm.pools.snapshots.num_used == 0


def test_branches_share_their_common_pages_and_each_restores_its_own_path(model, cold):
    """A trunk of 3 pages and three branches off it at different depths; then a continuation of each branch
    restores the deepest boundary of its own branch, and every result equals its cold run."""
    trunk = _ids(48, seed=1)
    branches = [trunk[:20] + _ids(30, seed=2), trunk + _ids(25, seed=3), trunk[:35] + _ids(40, seed=4)]
    warm = _engine(model, entries=64, max_batch_tokens=24)
    first = _run(warm, trunk + _ids(5, seed=5))
    assert first.cached_tokens == 0
    for branch, want_hit in zip(branches, [16, 48, 32], strict=True):
        got = _run(warm, branch)
        assert got.cached_tokens == want_hit
        _same(got, cold(branch))
    cache = warm.prefix_cache
    depth1 = [n for n in cache.nodes.values() if n.depth == 1]
    assert len(depth1) == 1 and len(depth1[0].children) == 2  # the trunk's page 1 is shared; page 2 branches
    for branch, extra_seed in zip(branches, [6, 7, 8], strict=True):
        cont = branch + _ids(19, seed=extra_seed)
        got = _run(warm, cont)
        assert got.cached_tokens == len(branch) // PAGE * PAGE
        _same(got, cold(cont))
    _check_tree(warm)
    assert warm.is_idle_and_empty()


def test_a_prefill_takes_its_snapshots_without_cutting_a_chunk_or_adding_a_forward(model):
    """Turn 1 of a conversation costs what it costs without a cache: one forward for a prompt within the budget
    (then one a decode step), and the snapshots of its 6 boundaries are there after it."""
    prompt = _ids(100, seed=11)
    counts = []
    for entries in (0, 16):
        engine = _engine(model, entries=entries)
        counts.append(_count_forwards(engine))
        _run(engine, prompt)
    assert counts[0] == counts[1] == [[100], [1], [1], [1]]
    assert len(engine.prefix_cache.lru) == 6


def test_snapshots_beyond_the_budget_go_least_recently_used_first(model, cold):
    """Three snapshot slots for prompts of several boundaries each: the newest boundaries stay, a hit marks its
    snapshot used, every restored request still equals its cold run, and nothing leaks."""
    warm = _engine(model, entries=3, max_batch_tokens=40)
    a, b = _ids(70, seed=21), _ids(60, seed=22)
    _run(warm, a)  # boundaries 16 … 64: only the last three snapshots stay
    cache = warm.prefix_cache
    assert sorted(n.depth for n in cache.lru.values()) == [2, 3, 4]
    assert len(cache.nodes) == 4 and cache.stats.evictions == 1  # the page of depth 1 stays: its subtree needs it
    got = _run(warm, a[:40] + _ids(9, seed=23))  # restores 32 (now the most recently used), snapshots its 48
    assert got.cached_tokens == 32
    assert [n.depth for n in cache.lru.values()] == [4, 2, 3]  # a's 48 went: the least recently used
    _run(warm, b)  # three new boundaries: the three others go, and with them every node of a's path
    assert sorted(n.depth for n in cache.lru.values()) == [1, 2, 3] and len(cache.nodes) == 3
    for prompt, hit in ((b[:50] + [7, 7, 7], 48), (a[:66], 0)):
        got = _run(warm, prompt)
        assert got.cached_tokens == hit
        _same(got, cold(prompt))
    _check_tree(warm)
    assert warm.is_idle_and_empty()
    warm.prefix_cache.clear()
    assert warm.pools.pages.num_used == 0 and warm.pools.snapshots.num_used == 0


def test_page_pressure_evicts_leaves_and_admission_never_fails_for_the_cache(model, cold):
    """A pool that holds one 100-token request at a time: the tree gives its pages back leaf by leaf."""
    warm = _engine(model, entries=32, num_pages=8)
    for seed in range(4):
        prompt = _ids(96, seed=30 + seed)
        got = _run(warm, prompt, SamplingParams(max_new_tokens=30, ignore_eos=True))
        assert got.cached_tokens == 0
    assert warm.prefix_cache.stats.page_evictions > 0
    _check_tree(warm)
    assert warm.is_idle_and_empty()
    warm.prefix_cache.clear()
    assert warm.pools.pages.num_used == 0


def test_an_aborted_prefill_leaves_the_snapshots_it_completed(model, cold):
    warm = _engine(model, entries=16, max_batch_tokens=40)
    prompt = _ids(120, seed=41)
    request = warm.submit(prompt, PARAMS)
    warm.step()
    warm.step()  # 80 tokens computed: boundaries 16 … 80
    assert warm.abort(request.request_id)
    assert sorted(n.depth for n in warm.prefix_cache.lru.values()) == [1, 2, 3, 4, 5]
    assert warm.pools.slots.num_used == 0
    got = _run(warm, prompt)
    assert got.cached_tokens == 80
    _same(got, cold(prompt))
    _check_tree(warm)
    assert warm.is_idle_and_empty()


@pytest.mark.skipif(not triton_interpreting(), reason="runs the kernels in the Triton interpreter (CPU only)")
def test_snapshots_taken_through_the_triton_kernels_restore_what_the_references_give(model, monkeypatch):
    """The capture rows (engine/batch.py) through the ring-write and compressor kernels: the snapshot at 16 is
    taken inside a chunk, the one at 32 after a chunk start off the page (the slot copied in first); a request
    restored from 32 on the kernels draws the tokens of a cold run on the references."""
    a = _ids(36, seed=51)
    b = a[:34] + _ids(4, seed=52)
    params = SamplingParams(max_new_tokens=3, ignore_eos=True)
    monkeypatch.setenv("SPARSEPD_FORCE_TRITON", "0")
    want = _run(_engine(model, entries=0, max_batch_tokens=24), b, params).output_ids
    monkeypatch.setenv("SPARSEPD_FORCE_TRITON", "1")
    warm = _engine(model, entries=4, max_batch_tokens=24)
    _run(warm, a, params)
    got = _run(warm, b, params)
    assert got.cached_tokens == 32 and got.output_ids == want
    assert warm.is_idle_and_empty()


def test_the_host_tier_keeps_evicted_snapshots_and_restores_them(model, cold):
    """Two snapshot slots and room for three snapshots in host memory: a prefill of five boundaries (one a
    forward) leaves the last two in slots and the first three on the host; a request sharing 40 tokens restores
    32 from the host and equals its cold run; more boundaries push the host tier's least recently used out, never
    past its bound; page pressure and clear() empty both tiers."""
    slot_bytes = bytes_per_snapshot(CFG)
    warm = _engine(model, entries=2, max_batch_tokens=16, host_bytes=3 * slot_bytes)
    cache = warm.prefix_cache
    a = _ids(90, seed=61)
    _run(warm, a)
    assert sorted(n.depth for n in cache.lru.values()) == [4, 5]
    assert sorted(n.depth for n in cache.host_lru.values()) == [1, 2, 3] and cache.host_used == 3 * slot_bytes
    b = a[:40] + _ids(20, seed=62)
    got = _run(warm, b)
    assert got.cached_tokens == 32 and cache.stats.host_hit_tokens == 32
    _same(got, cold(b))
    _run(warm, _ids(70, seed=63))  # four more boundaries: slots → host → out, least recently used first
    assert cache.num_host_snapshots == 3 and cache.host_used == 3 * slot_bytes and cache.stats.host_evictions > 0
    # the host tier keeps the three most recently moved there: b's 48 and the new prompt's 16 and 32
    assert sorted(n.depth for n in cache.host_lru.values()) == [1, 2, 3]
    _check_tree(warm)
    again = b[:55] + _ids(10, seed=64)
    got = _run(warm, again)
    assert got.cached_tokens == 48 and cache.stats.host_hit_tokens == 32 + 48
    _same(got, cold(again))
    assert warm.is_idle_and_empty()
    warm.prefix_cache.clear()
    assert warm.pools.pages.num_used == 0 and warm.pools.snapshots.num_used == 0 and cache.host_used == 0


def test_with_fewer_slots_than_boundaries_in_a_forward_the_deepest_are_taken(model, cold):
    """One 100-token chunk crosses six boundaries and two snapshot slots are free: the two deepest are taken
    (the next turn of the conversation restores the deepest)."""
    warm = _engine(model, entries=2)
    a = _ids(100, seed=71)
    _run(warm, a)
    assert [n.depth for n in warm.prefix_cache.lru.values()] == [5, 6]
    nxt = a + _ids(9, seed=72)
    got = _run(warm, nxt)
    assert got.cached_tokens == 96
    _same(got, cold(nxt))
    _check_tree(warm)
