"""Prefix caching over compressed state (docs/DESIGN.md §9): a prompt that starts with a prefix an earlier request
computed restores that request's state at the prefix's end and prefills only the rest.

At a page boundary p (a multiple of the page size, the lcm of the compress ratios) a request's state is
(engine/state_io.py): the committed compressed entries and indexer rows of positions < p, in its first p/page
pages, immutable once written; and its slot: the SWA ring (the last `window` positions) and the compressor and
indexer rings (CSA's overlapping half-block). An entry keeps the pages by reference (the page allocator counts
holders; a shared page is never written again: positions ≥ p land in later pages) and a copy of the slot taken
right after the forward that computed position p − 1 (the scheduler ends that chunk at p). A hit shares the
entry's pages and copies the snapshot into the new request's slot: exactly the state its own prefill would have
built, so prefill resumes at p.

Entries are keyed by the hash of their tokens (sparsepd/prefix_hash.py: page-aligned prefixes named in one pass,
the names the router matches against) — a radix tree at page granularity, flattened into one map of
prefixes, each with its own snapshot. One entry per request, at the last page boundary before its prompt's
end (so the next turn of a conversation, which extends the prompt, finds it). Bounded by `max_entries`
(snapshots take a slot's bytes each, counted in the pools' memory plan); an entry a request was restored from
goes first once that request's own entry extends it, then the least recently used,
and under page pressure before any admission fails (`make_room`): a cache never refuses a request an empty
cache would take. Evicting an entry drops its holds: pages a running request still holds stay.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sparsepd.engine.pools import KVPools
from sparsepd.engine.state_io import slot_views
from sparsepd.prefix_hash import prefix_hashes


@dataclass
class CacheEntry:
    key: int  # prefix_hashes(tokens)[-1]
    num_tokens: int  # p: a multiple of the page size
    pages: tuple[int, ...]  # the first p / page_size pages of the request that computed it
    snapshot: dict[str, torch.Tensor]  # its slot's pieces at position p (engine/state_io.slot_views)


@dataclass
class CacheStats:
    hit_tokens: int = 0  # prompt tokens restored instead of computed
    miss_tokens: int = 0  # prompt tokens computed by requests that looked the cache up
    hits: int = 0
    lookups: int = 0
    inserts: int = 0
    evictions: int = 0


class PrefixCache:
    def __init__(self, pools: KVPools, max_entries: int):
        if max_entries < 1:
            raise ValueError(f"a prefix cache needs max_entries ≥ 1, got {max_entries}")
        self.pools, self.max_entries = pools, max_entries
        self.page_size = pools.geometry.page_size
        self.entries: OrderedDict[int, CacheEntry] = OrderedDict()  # least recently used first
        self.stats = CacheStats()

    # --- lookups -----------------------------------------------------------------------------------
    def match(self, tokens: Sequence[int], limit: int) -> CacheEntry | None:
        """The entry of the longest page-aligned prefix of tokens[:limit] held here (marked recently used)."""
        self.stats.lookups += 1
        hashes = prefix_hashes(tokens, self.page_size, limit)
        for k in range(len(hashes), 0, -1):
            entry = self.entries.get(hashes[k - 1])
            if entry is not None:
                self.entries.move_to_end(entry.key)
                return entry
        return None

    def restore(self, entry: CacheEntry, slot: int) -> None:
        """Copy the entry's snapshot into `slot` (the caller already holds the entry's pages: they become the
        new holder's first pages)."""
        for name, (pool, index) in slot_views(self.pools, slot).items():
            pool[index] = entry.snapshot[name]
        self.stats.hits += 1
        self.stats.hit_tokens += entry.num_tokens

    def boundary(self, num_known: int) -> int:
        """Where an entry for a request of num_known tokens goes: the last page boundary before its last token
        (0: none)."""
        return (num_known - 1) // self.page_size * self.page_size if num_known > 0 else 0

    # --- inserts -------------------------------------------------------------------------------------
    def insert(self, tokens: Sequence[int], pages: Sequence[int], slot: int, superseded: int | None = None) -> None:
        """Keep the state of a request that has just computed tokens (a page-aligned prefix): its first pages by
        reference and a copy of its slot (stream-ordered after the forward that wrote them). `superseded`: the
        key of the entry the request was restored from; the new one extends it (a conversation's next turn), so
        it goes first when room is needed (a conversation resends its latest turn, not an earlier one)."""
        if not tokens or len(tokens) % self.page_size:
            raise ValueError(f"a cached prefix is a positive multiple of {self.page_size} tokens, got {len(tokens)}")
        key = prefix_hashes(tokens, self.page_size)[-1]
        if key in self.entries:
            self.entries.move_to_end(key)
            return
        held = list(pages[: len(tokens) // self.page_size])
        self.pools.pages.share(held)
        snapshot = {name: pool[index].clone() for name, (pool, index) in slot_views(self.pools, slot).items()}
        self.entries[key] = CacheEntry(key, len(tokens), tuple(held), snapshot)
        self.stats.inserts += 1
        if superseded is not None and superseded in self.entries:
            self.entries.move_to_end(superseded, last=False)
        while len(self.entries) > self.max_entries:
            self._evict_oldest()

    # --- memory ----------------------------------------------------------------------------------------
    def make_room(self, num_pages: int) -> None:
        """Evict least recently used entries until num_pages pages are free, or none is left."""
        while self.entries and not self.pools.pages.can_allocate(num_pages):
            self._evict_oldest()

    def clear(self) -> None:
        while self.entries:
            self._evict_oldest()

    def _evict_oldest(self) -> None:
        _, entry = self.entries.popitem(last=False)
        self.pools.pages.free(list(entry.pages))
        self.stats.evictions += 1

    def held_pages(self) -> dict[int, int]:
        """page → how many entries hold it. (Read by a worker's Stats beside the thread that steps the engine:
        the copies of the map are taken whole under the GIL.)"""
        out: dict[int, int] = {}
        for entry in list(self.entries.values()):
            for page in entry.pages:
                out[page] = out.get(page, 0) + 1
        return out

    def reclaimable_pages(self) -> int:
        """Pages only entries hold: free once those entries are evicted (counted as free in a worker's Stats)."""
        return sum(1 for page, n in self.held_pages().items() if self.pools.pages.refs(page) == n)

    def hashes(self) -> list[int]:
        """The keys of the entries, most recently used first (what a worker reports to the router)."""
        return list(reversed(list(self.entries)))
