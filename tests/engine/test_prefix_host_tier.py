"""The prefix cache's host tier and slim snapshots (engine/prefix_cache.py, engine/snapshot_store.py,
engine/host_memory.py): a snapshot holds what a restore reads (its size from the pool geometry); tree pages
evicted under page pressure move to host memory and come back on a hit when copying beats recomputing, the
result equal to a cold prefill in tokens and log-probabilities; both tiers evict under pressure within one bound;
retracted requests' states count against that bound (the tier's entries go first); aborts leak nothing."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from sparsepd.engine.engine import Engine
from sparsepd.engine.generate import generate
from sparsepd.engine.pools import PoolConfig, bytes_per_page, bytes_per_slot, bytes_per_snapshot
from sparsepd.engine.sampling import SamplingParams
from sparsepd.engine.state_io import state_num_bytes
from sparsepd.model.weights import build_model
from sparsepd.model_config import get_preset
from sparsepd.prefix_hash import prefix_hashes

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


def _engine(model, entries: int, num_pages: int, host_bytes: int, max_batch_tokens: int = 512,
            num_slots: int = 4, max_retracted_bytes: int | None = None) -> Engine:
    return Engine(model, PoolConfig(num_slots=num_slots, max_batch_tokens=max_batch_tokens, num_pages=num_pages,
                                    prefix_cache_entries=entries, prefix_cache_host_bytes=host_bytes),
                  max_retracted_bytes=max_retracted_bytes)


def _run(engine: Engine, prompt: list[int], params: SamplingParams = PARAMS):
    return run_to_length(engine, prompt, params)


def _check(engine: Engine) -> None:
    """The tree's invariants and one account of the host bytes."""
    cache, host = engine.prefix_cache, engine.host_memory
    for node in cache.nodes.values():
        assert node.children or node.restorable
        assert (node.page >= 0) != (node.host_page is not None)
        if node.page < 0:
            assert all(c.page < 0 for c in node.children.values())  # host pages end the paths
    assert cache.host_used == host.cached == (cache.num_host_snapshots * cache.snapshot_bytes
                                              + cache.num_host_pages * cache.page_bytes)
    assert host.cached + host.retracted <= host.limit
    assert engine.pools.snapshots.num_used == 0


def _empty_after_clear(engine: Engine) -> None:
    assert engine.is_idle_and_empty()
    engine.prefix_cache.clear()
    assert engine.pools.pages.num_used == 0 and engine.host_memory.cached == 0 and engine.host_memory.retracted == 0
    assert not engine.prefix_cache.nodes and len(engine.prefix_cache.free_entries) == engine.prefix_cache.max_entries


def test_a_snapshot_holds_what_a_restore_reads():
    """Per layer the SWA ring; per CSA layer the carried half-block of the compressor's and the indexer's rings;
    nothing of an HCA ring. On `bench` (FP8 rows of 584 bytes, head_dim 512, index_head_dim 128, layers
    0/4/128/4): 380,928 bytes per branch point against a whole slot's 987,136."""
    bench = get_preset("bench")
    swa = bench.window * 584
    csa = 2 * 4 * 2 * 512 * 4 + 2 * 4 * 2 * 128 * 4
    assert bytes_per_snapshot(bench) == 4 * swa + 2 * csa == 380_928
    assert bytes_per_slot(bench) == 987_136
    pools = _engine(build_model(CFG, seed=0), entries=3, num_pages=8, host_bytes=0).pools
    assert pools.snapshot_store.entry_bytes == bytes_per_snapshot(CFG) < bytes_per_slot(CFG)
    assert pools.geometry.num_snapshot_entries == 3 and pools.snapshots.capacity == 3  # capture slots ≤ entries


def _push_to_host(engine: Engine, a: list[int]) -> None:
    """Prefill `a`, then two other prompts whose pages and snapshots push a's to the host tier."""
    _run(engine, a)
    for seed in (81, 82):
        _run(engine, _ids(100, seed=seed))


@pytest.mark.parametrize("shared,tail", [(52, 7), (99, 4)])
def test_pages_evicted_to_the_host_come_back_on_a_hit_equal_to_a_cold_prefill(model, shared, tail):
    """A pool of 10 pages for prompts of 7: a's deeper pages and its snapshots go to the host tier under pressure;
    a request sharing `shared` tokens restores the page-aligned prefix with those pages copied back (a restore
    at a page = window = HCA-block boundary; its tail ends on or off a CSA block) and equals a cold prefill."""
    cold = _engine(model, entries=1, num_pages=64, host_bytes=0)
    warm = _engine(model, entries=4, num_pages=10, host_bytes=4_000_000)
    cache = warm.prefix_cache
    a = _ids(100, seed=shared)
    _push_to_host(warm, a)
    assert cache.num_host_pages > 0 and cache.stats.host_page_inserts > 0
    _check(warm)
    b = a[:shared] + _ids(tail, seed=500 + tail)
    got = _run(warm, b)
    assert got.cached_tokens == shared // PAGE * PAGE
    assert cache.stats.host_page_restores > 0 and cache.stats.host_hit_tokens == got.cached_tokens
    cache_off = _run(cold, b)
    _same(got, cache_off)
    _check(warm)
    _empty_after_clear(warm)


def test_the_cost_rule_recomputes_when_copying_is_dearer(model):
    """With recomputing priced far below copying, the same request restores only what needs no host copy (here:
    nothing), copies no page back, and still equals its cold run; priced the other way, it copies."""
    cold = _engine(model, entries=1, num_pages=64, host_bytes=0)
    warm = _engine(model, entries=4, num_pages=10, host_bytes=4_000_000)
    cache = warm.prefix_cache
    a = _ids(100, seed=91)
    _push_to_host(warm, a)
    path = [cache.nodes[k] for k in prefix_hashes(a, PAGE, 80)]
    assert path[-1].restorable and (path[-1].snapshot is None or any(n.page < 0 for n in path))  # needs host bytes
    b = a[:90] + _ids(5, seed=92)
    cache.prefill_tokens_per_s = 1e18
    got = _run(warm, b)
    assert cache.stats.host_page_restores == 0 and cache.stats.host_hit_tokens == 0
    _same(got, _run(cold, b))
    assert got.cached_tokens < 80  # not a's host-tier restore point
    cache.prefill_tokens_per_s = 1e4
    c = a[:90] + _ids(6, seed=93)
    got = _run(warm, c)
    assert got.cached_tokens == 80 and cache.stats.host_hit_tokens == 80
    _same(got, _run(cold, c))
    _check(warm)
    _empty_after_clear(warm)


def test_both_tiers_evict_under_pressure_within_the_bound(model):
    """A host tier of two snapshots and three pages: many prompts through a pool of 10 pages and 2 store entries
    evict from the device to the host and from the host out, never past the bound; every leaf keeps a snapshot."""
    bound = 2 * bytes_per_snapshot(CFG) + 3 * bytes_per_page(CFG)
    warm = _engine(model, entries=2, num_pages=10, host_bytes=bound, max_batch_tokens=48)
    cache = warm.prefix_cache
    prompts = [_ids(70 + 9 * i, seed=100 + i) for i in range(5)]
    for prompt in prompts:
        request = warm.submit(prompt, SamplingParams(max_new_tokens=3, ignore_eos=True))
        while not request.finish_reason:
            warm.step()
            assert 0 < cache.host_used <= bound or cache.host_used == 0
        _check(warm)
    s = cache.stats
    assert s.evictions > 0 and s.host_inserts > 0 and s.host_page_inserts > 0
    assert s.host_evictions > 0 and s.host_page_evictions > 0 and s.page_evictions > 0
    again = prompts[-1][:60] + [1, 2, 3]
    got = _run(warm, again, SamplingParams(max_new_tokens=3, ignore_eos=True))
    assert got.cached_tokens == 48
    assert got.output_ids == generate(model, again, SamplingParams(max_new_tokens=3, ignore_eos=True)).output_ids
    _check(warm)
    _empty_after_clear(warm)


def test_an_abort_during_a_restore_leaks_no_page_or_host_byte(model):
    """A request restored with pages copied back from the host, aborted after one chunk of its prefill: its slot
    and pages are free again, the copied-back pages stay the tree's, the host bytes are the tier's items."""
    warm = _engine(model, entries=4, num_pages=10, host_bytes=4_000_000, max_batch_tokens=8)
    cache = warm.prefix_cache
    a = _ids(100, seed=111)
    _push_to_host(warm, a)
    request = warm.submit(a[:99] + [5] * 20, PARAMS)
    warm.step()
    assert request.cached_tokens == 96 and request.prefilling and cache.stats.host_page_restores > 0
    assert warm.abort(request.request_id)
    assert warm.pools.slots.num_used == 0
    _check(warm)
    _empty_after_clear(warm)


def _retracting_engine(model, host_bytes: int) -> tuple[Engine, list]:
    """A pool of 4 pages with a host tier: a 48-token prefill, a page a forward, fills the tree (2 snapshots to the
    host), then three requests that decode 24 tokens each cannot all grow: one is retracted."""
    engine = _engine(model, entries=1, num_pages=4, host_bytes=host_bytes, max_batch_tokens=16, num_slots=8)
    _run(engine, _ids(48, seed=120), SamplingParams(max_new_tokens=1, ignore_eos=True))
    assert engine.prefix_cache.num_host_snapshots == 2
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    prompts = [_ids(n, seed=10 + n) for n in (9, 14, 5)]
    return engine, [(engine.submit(p, params, f"r{i}"), p, params) for i, p in enumerate(prompts)]


def _retraction_bytes(model) -> int:
    probe = _engine(model, entries=1, num_pages=64, host_bytes=0)
    one = probe.submit(_ids(30, seed=1), SamplingParams(max_new_tokens=2, ignore_eos=True))
    probe.step()  # 30 tokens computed: as large as a state of the requests above gets before it is retracted
    return state_num_bytes(probe.pools, one)


def test_a_retraction_evicts_host_tier_entries_and_shares_their_bound(model):
    """The host bound holds one retracted state: the tier's entries give way to it (the retraction succeeds,
    the bound is never passed); a second retraction finds no room and fails the newest decoding request, naming
    both flags; the others give the reference's tokens, and the retracted bytes are back to 0 after."""
    bound = _retraction_bytes(model)
    engine, runs = _retracting_engine(model, host_bytes=bound)
    host, cache = engine.host_memory, engine.prefix_cache
    assert host.limit == host.retracted_limit == bound
    outputs = []
    while engine.scheduler.has_work:
        outputs += engine.step()
        assert host.retracted + host.cached <= bound
    assert engine.scheduler.retractions >= 1
    assert cache.stats.host_evictions + cache.stats.host_page_evictions > 0
    failed = [r for r, _, _ in runs if r.finish_reason == "error"]
    assert len(failed) == 1
    assert "--prefix-cache-host-bytes" in failed[0].error and "over the bound of" in failed[0].error
    for r, p, sp in runs:
        if r is not failed[0]:
            want = generate(model, p, sp)
            assert (r.finish_reason, r.output_ids) == (want.finish_reason, want.output_ids), r.request_id
    assert host.retracted == 0
    _check(engine)
    _empty_after_clear(engine)


def test_aborting_a_retracted_request_gives_its_host_bytes_back(model):
    engine, runs = _retracting_engine(model, host_bytes=10_000_000)
    while engine.scheduler.retractions == 0:
        engine.step()
    retracted = next(r for r in engine.scheduler.waiting if r.offloaded is not None)
    assert engine.host_memory.retracted == sum(t.nbytes for t in retracted.offloaded.values()) > 0
    assert engine.abort(retracted.request_id)
    assert engine.host_memory.retracted == 0
    engine.scheduler.run_to_completion()
    _check(engine)
    _empty_after_clear(engine)


def test_the_flags_give_one_bound():
    from sparsepd.engine.host_memory import HostMemory
    assert (HostMemory.for_engine(0, None, 999).limit, HostMemory.for_engine(0, 5, 999).limit) == (999, 5)
    tier = HostMemory.for_engine(100, None, 999)
    assert (tier.limit, tier.retracted_limit) == (100, 100)
    assert HostMemory.for_engine(100, 40, 999).retracted_limit == 40
    assert HostMemory.for_engine(100, 400, 999).retracted_limit == 100  # never more than the shared bound
