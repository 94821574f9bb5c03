"""The scheduler's side of the prefix cache (engine/prefix_cache.py): where a request restores from, and the
boundary snapshots its prefill takes on the way.

A request that looks the cache up (a prompt prefilled from its first token, not a fork that only draws) restores
from the deepest snapshot on its path and then snapshots every page boundary its prefill computes, up to the last
one at or before the end of its known tokens (`cache_at`). A snapshot is taken inside the forward that computes
the boundary, wherever the chunk ends: before the forward, a snapshot slot is taken for each boundary the chunk
crosses (`plan`) and, when the chunk starts less than a ring's length before the boundary, the request's slot is
copied into it (the ring rows of positions before the chunk); the forward's ring writes of the positions before
the boundary also go to that slot (engine/batch.py `capture_rows`); after it is queued, the tree saves what a
restore reads from each slot into its snapshot store and frees the slot (`commit`). No chunk is cut at a boundary
and no forward is added.
"""

from __future__ import annotations

from sparsepd.engine.pools import KVPools
from sparsepd.engine.prefix_cache import Hit, PrefixCache, copy_slot
from sparsepd.engine.request import Request
from sparsepd.prefix_hash import prefix_hashes


class PrefixRestore:
    def __init__(self, pools: KVPools, cache: PrefixCache):
        self.pools, self.cache = pools, cache
        g = pools.geometry
        self.page_size = g.page_size
        # positions before a boundary whose state a slot holds: the SWA window and the longest compressor ring
        self.carry = max([g.window, *((2 if r == 4 else 1) * r for r in g.ratios if r)])

    @staticmethod
    def cacheable(request: Request) -> bool:
        return not request.stateless and request.num_computed == 0 and request.prefilling

    def lookup(self, request: Request) -> Hit | None:
        """Where to restore the request from: the deepest snapshot on its path that leaves a token to compute
        (the first draw needs its logits) and no prompt position it must score."""
        if not self.cacheable(request):
            return None
        limit = request.num_known - 1
        if request.params.logprob_start_len is not None:
            limit = min(limit, request.params.logprob_start_len)
        return self.cache.match(request.prompt_ids + request.output_ids, limit)

    def start(self, request: Request, hit: Hit | None) -> None:
        """The hit's snapshot into the request's slot (when there is one; its pages are already the request's
        first ones), and the last boundary the request's prefill snapshots."""
        if hit is not None:
            self.cache.restore(hit, request.slot)
            request.num_computed = request.cached_tokens = hit.num_tokens
            request.restored_from = hit.key
        self.cache.stats.miss_tokens += request.num_known - request.num_computed
        at = self.cache.boundary(request.num_known)
        request.cache_at = at if at > request.num_computed else None

    def restore_reserved(self, request: Request) -> int:
        """A reserved request whose prompt is known now (the colocated worker's): restore its longest cached
        prefix into the slot and pages it holds (the path's pages replace its first ones); the tokens restored."""
        if not self.cacheable(request) or request.slot is None:
            return 0
        hit = self.lookup(request)
        if hit is not None:
            k = len(hit.pages)
            self.pools.pages.share(list(hit.pages))
            self.pools.pages.free(request.pages[:k])
            request.pages[:k] = list(hit.pages)
        self.start(request, hit)
        return request.cached_tokens

    def plan(self, scheduled: list[tuple[Request, list[int]]]) -> list[Request]:
        """Before a forward: a capture slot for every boundary a prefill chunk crosses that the tree has no
        snapshot of (`request.captures`; deepest first while slots last); the requests that take some."""
        page, keys, capturing = self.page_size, set(), []
        for request, tokens in scheduled:
            if request.cache_at is None:
                continue
            start = request.num_computed
            end = min(start + len(tokens), request.cache_at)
            first = (start // page + 1) * page
            if first > end:
                continue
            if request.cache_hashes is None:
                request.cache_hashes = prefix_hashes(request.prompt_ids + request.output_ids, page, request.cache_at)
            captures = []
            for p in range(end // page * page, first - 1, -page):  # deepest first: they matter most when slots are few
                key = request.cache_hashes[p // page - 1]
                if key in keys or self.cache.has_snapshot(key):
                    continue
                slot = self.cache.take_slot()
                if slot is None:
                    break
                keys.add(key)
                if p - self.carry < start:  # ring rows of positions before the chunk: from the request's slot
                    copy_slot(self.pools, request.slot, slot)
                captures.append((p, slot))
            if captures:
                request.captures = tuple(reversed(captures))  # the tree adopts them shallowest first
                capturing.append(request)
        return capturing

    def commit(self, capturing: list[Request]) -> list[tuple[int, int]]:
        """After the forward is queued: the tree takes the snapshots it captured (copies stream-ordered after it).
        Returns (store entry, capture slot) of each snapshot saved: a layer that runs after the model's forward
        (the MTP layer) writes its part into those slots and saves it then (`SnapshotStore.save_extra`); the
        slots are free again but not reused before the next step's forward."""
        saved = []
        for request in capturing:
            for p, slot in request.captures:
                k = p // self.page_size
                entry = self.cache.insert(request.cache_hashes[:k], request.pages[:k], slot, request.restored_from)
                if entry is not None:
                    saved.append((entry, slot))
            request.captures = ()
        return saved

    def cancel(self, capturing: list[Request]) -> None:
        """The forward failed: its capture slots back, unwritten."""
        for request in capturing:
            self.pools.snapshots.free([slot for _, slot in request.captures])
            request.captures = ()
