"""The prefix cache (engine/prefix_cache.py): a request restored from a cached prefix gives the tokens and
log-probabilities of a cold prefill, for prefixes ending on, before and after compress-block and window
boundaries; pages are shared by reference count and freed only when the last holder lets go; eviction makes
room before any admission fails and never frees a page a request holds; aborts free everything."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from sparsepd.engine.engine import Engine
from sparsepd.engine.pools import IdAllocator, OutOfCapacity, PoolConfig
from sparsepd.engine.sampling import SamplingParams
from sparsepd.model.weights import build_model
from sparsepd.model_config import get_preset
from sparsepd.prefix_hash import longest_match, prefix_hashes

sys.path.insert(0, str(Path(__file__).parent))
from prefix_cases import ids as _ids  # noqa: E402
from prefix_cases import same_as_cold as _same  # noqa: E402

CFG = get_preset("tiny")  # page 16 tokens = 4 CSA blocks = 1 HCA block = the window
PAGE = CFG.page_size
PARAMS = SamplingParams(max_new_tokens=5, ignore_eos=True, logprobs=True, top_logprobs=4)


@pytest.fixture(scope="module")
def model():
    return build_model(CFG, seed=0)


def _engine(model, entries: int, num_pages: int = 96, max_batch_tokens: int = 40) -> Engine:
    return Engine(model, PoolConfig(num_slots=4, max_batch_tokens=max_batch_tokens, num_pages=num_pages,
                                    prefix_cache_entries=entries))


def _run(engine: Engine, prompt: list[int], params: SamplingParams = PARAMS):
    request = engine.submit(prompt, params)
    engine.scheduler.run_to_completion()
    return request


# first prompt length, second prompt = first[:shared] + new tokens. The first request's last restore point is the
# last page boundary at or before its prompt's end, so the restored position is a page (= window, HCA block) boundary,
# and the second request's own tokens start on, before and after CSA-block and window boundaries of the positions
# it computes. (Every case shares at least the first request's last boundary: test_prefix_tree.py has the rest.)
CASES = [(17, 17, 9), (33, 33, 1), (40, 40, 30), (47, 36, 12), (64, 64, 5), (70, 66, 19), (70, 65, 1)]


@pytest.mark.parametrize("first,shared,extra", CASES)
def test_a_hit_gives_the_cold_prefills_tokens_and_logprobs(model, first, shared, extra):
    a = _ids(first, seed=first)
    b = a[:shared] + _ids(extra, seed=1000 + extra)
    warm = _engine(model, entries=8)
    _run(warm, a)
    got = _run(warm, b)
    want = _run(_engine(model, entries=0), b)
    hit = min(first // PAGE, shared // PAGE, (len(b) - 1) // PAGE) * PAGE
    assert hit <= shared and hit < len(b)
    assert got.cached_tokens == hit and hit > 0
    _same(got, want)
    stats = warm.prefix_cache.stats
    assert stats.hits == 1 and stats.hit_tokens == hit and stats.miss_tokens == first + len(b) - hit
    assert warm.is_idle_and_empty()


def test_a_prefix_shorter_than_the_last_boundary_hits_a_boundary_before_it(model):
    """A request sharing fewer tokens than the first one's last boundary restores the boundary before the point
    where they part (before the radix tree, it computed them all)."""
    a = _ids(40, seed=5)
    warm = _engine(model, entries=8)
    _run(warm, a)
    b = a[:30] + _ids(10, seed=6)
    got = _run(warm, b)
    assert got.cached_tokens == 16 and warm.prefix_cache.stats.hits == 1
    _same(got, _run(_engine(model, entries=0), b))


def test_a_conversation_hits_each_turn_and_equals_cold_runs(model):
    """Turn k+1 = turn k's prompt + its output + new tokens; each turn restores the previous turn's entry."""
    warm, cold = _engine(model, entries=8), _engine(model, entries=0)
    prompt, previous = _ids(21, seed=3), 0
    for _ in range(4):
        got, want = _run(warm, prompt), _run(cold, prompt)
        _same(got, want)
        assert got.cached_tokens == previous
        previous = len(prompt) // PAGE * PAGE  # its last page boundary (the next turn resends it and more)
        prompt = prompt + got.output_ids + _ids(7 + len(prompt) % 5, seed=len(prompt))
    assert warm.is_idle_and_empty()


def test_prompt_logprobs_limit_the_hit_to_their_start(model):
    a = _ids(50, seed=8)
    warm = _engine(model, entries=8)
    _run(warm, a[:20])  # a restore point at 16
    _run(warm, a)  # and at 32 and 48
    params = PARAMS.model_copy(update=dict(logprob_start_len=40))
    got, want = _run(warm, a, params), _run(_engine(model, entries=0), a, params)
    assert got.cached_tokens == 32  # the boundary at 48 would skip positions 40..47, which it must score
    _same(got, want)
    assert [x.logprob for x in got.prompt_logprobs] == pytest.approx([x.logprob for x in want.prompt_logprobs],
                                                                     rel=1e-4, abs=1e-5)


def test_shared_pages_are_freed_by_their_last_holder_and_aborts_free_everything(model):
    engine = _engine(model, entries=8)
    a = _ids(40, seed=11)
    _run(engine, a)
    entry = engine.prefix_cache.match(a, 40)  # the restore point at 32 (and the one at 16 on its path)
    assert entry.num_tokens == 32 and len(engine.prefix_cache.lru) == 2
    assert all(engine.pools.pages.refs(p) == 1 for p in entry.pages)
    request = engine.submit(a + [1, 2, 3], PARAMS)
    engine.step()  # admitted: restored from the entry
    assert request.cached_tokens == 32 and request.pages[:2] == list(entry.pages)
    assert all(engine.pools.pages.refs(p) == 2 for p in entry.pages)
    engine.prefix_cache.clear()  # evicting the tree frees none of the pages the request holds
    assert all(engine.pools.pages.refs(p) == 1 for p in entry.pages)
    assert engine.abort(request.request_id)
    assert engine.pools.pages.num_used == 0 and engine.pools.slots.num_used == 0


def test_eviction_makes_room_before_an_admission_fails(model):
    """A pool that only fits one request at a time: the cache gives its pages back rather than refuse."""
    engine = _engine(model, entries=8, num_pages=6)  # 96 tokens
    for seed in range(5):
        request = _run(engine, _ids(60, seed=seed), SamplingParams(max_new_tokens=30, ignore_eos=True))
        assert request.finish_reason == "length"
    assert engine.prefix_cache.stats.evictions >= 3 and engine.is_idle_and_empty()
    engine.prefix_cache.clear()
    assert engine.pools.pages.num_used == 0
    with pytest.raises(OutOfCapacity):  # what no pool could ever hold is still refused at once
        engine.submit(_ids(60, seed=9), SamplingParams(max_new_tokens=60, ignore_eos=True))


def test_entries_are_bounded_least_recently_used_first(model):
    engine = _engine(model, entries=2)
    prompts = [_ids(20, seed=s) for s in range(3)]
    for p in prompts:
        _run(engine, p)
    assert len(engine.prefix_cache.lru) == 2
    held = set(engine.prefix_cache.hashes())
    assert [longest_match(prefix_hashes(p, PAGE), held) for p in prompts] == [0, 1, 1]


def test_page_refcounts():
    pages = IdAllocator(4, "pages")
    a = pages.allocate(2)
    pages.share(a)
    pages.free(a)
    assert pages.num_free == 2 and [pages.refs(i) for i in a] == [1, 1]
    pages.free(a)
    assert pages.num_free == 4
    with pytest.raises(ValueError, match="double free"):
        pages.free([a[0]])
    with pytest.raises(ValueError, match="not allocated"):
        pages.share([a[0]])
    b = pages.allocate(1)
    with pytest.raises(ValueError, match="double free"):
        pages.free(b + b)  # one holder, freed twice in one call


def test_an_entry_a_turn_extends_goes_first(model):
    """Room for three entries, two conversations: A's second turn restores A's first entry and adds its own; a
    third prompt's entry then evicts A's superseded first entry, not B's (older by use), so B's second turn hits."""
    engine = _engine(model, entries=3)
    a1, b1 = _ids(20, seed=1), _ids(25, seed=2)
    a_first, b_first = _run(engine, a1), _run(engine, b1)
    a2 = _run(engine, a1 + a_first.output_ids + _ids(12, seed=3))
    assert a2.cached_tokens == 16
    _run(engine, _ids(30, seed=4))  # a fourth entry: one must go
    b2 = _run(engine, b1 + b_first.output_ids + _ids(3, seed=5))
    assert b2.cached_tokens == 16


def _slot_at(pools, slot: int, pages: list[int], boundary: int) -> dict[str, torch.Tensor]:
    """What a restore at `boundary` reads of a slot and its pages: every SWA ring row, the CSA rings' rows of the
    positions boundary − 4 … boundary − 1, and the committed compressed and indexer rows of the pages before it."""
    carried = torch.tensor([(boundary - 4 + j) % 8 for j in range(4)])
    out = {}
    for i, ratio in enumerate(pools.geometry.ratios):
        out[f"{i}.swa"] = pools.swa_view(i)[slot].clone()
        if ratio:
            out[f"{i}.kv_compressed"] = pools.compressed_view(i)[pages].clone()
        if ratio == 4:
            out[f"{i}.index_cache"] = pools.index_cache[i][pages].clone()
            for what, rings in (("compressor", pools.rings[i]), ("indexer", pools.index_rings[i])):
                out[f"{i}.{what}.kv"], out[f"{i}.{what}.score"] = (ring[slot][carried].clone() for ring in rings)
    return out


@pytest.mark.parametrize("budget", [64, 20])
def test_a_restored_slot_in_bf16_is_the_cold_prefills_state_bit_for_bit(budget):
    """bf16 activations with FP8 KV rows: B restores the prefix it shares with A at a page boundary whose snapshot
    A's prefill took inside a chunk (budget 64), or in a chunk that starts within a window of it (budget 20: the
    rows before the chunk copied into the capture slot); the slot and pages it gets equal, bit for bit, those a
    cold prefill of B's tokens up to that boundary leaves (the model's arithmetic is batch-invariant on the CPU, so
    any difference would be the snapshot's: a row from another rounding stage, a position off by one)."""
    model = build_model(get_preset("tiny", dtype="bfloat16"), seed=0)
    prefix = _ids(40, seed=40)
    a, b = prefix + _ids(9, seed=1), prefix + _ids(7, seed=2)
    warm = Engine(model, PoolConfig(num_slots=4, max_batch_tokens=budget, num_pages=32, prefix_cache_entries=8))
    _run(warm, a)
    hit = warm.prefix_cache.match(b, len(b) - 1)
    assert hit is not None and hit.num_tokens == 32
    slot = warm.pools.slots.allocate(1)[0]
    warm.pools.reset_slot(slot)
    warm.prefix_cache.restore(hit, slot)
    restored = _slot_at(warm.pools, slot, list(hit.pages), hit.num_tokens)

    cold = Engine(model, PoolConfig(num_slots=4, max_batch_tokens=64, num_pages=32))
    request = cold.submit(b[: hit.num_tokens], SamplingParams(max_new_tokens=2, ignore_eos=True))
    cold.step()  # the whole prefix in one chunk; the slot holds the state at its end
    assert request.num_computed == hit.num_tokens
    want = _slot_at(cold.pools, request.slot, request.pages[: hit.num_tokens // PAGE], hit.num_tokens)
    assert restored.keys() == want.keys()
    assert [name for name in want if not torch.equal(restored[name], want[name])] == []
