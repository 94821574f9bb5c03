"""The scheduler's side of the prefix cache (engine/prefix_cache.py): which cached prefix a request starts from,
where its own state becomes an entry, and the entry taken when its forward reaches that point."""

from __future__ import annotations

from sparsepd.engine.pools import KVPools
from sparsepd.engine.prefix_cache import CacheEntry, PrefixCache
from sparsepd.engine.request import Request


class PrefixRestore:
    def __init__(self, pools: KVPools, cache: PrefixCache):
        self.pools, self.cache = pools, cache

    @staticmethod
    def cacheable(request: Request) -> bool:
        return not request.stateless and request.num_computed == 0 and request.prefilling

    def lookup(self, request: Request) -> CacheEntry | None:
        """The cache entry to restore the request from: its longest cached page-aligned prefix that leaves a
        token to compute (the first draw needs its logits) and no prompt position it must score."""
        if not self.cacheable(request):
            return None
        limit = request.num_known - 1
        if request.params.logprob_start_len is not None:
            limit = min(limit, request.params.logprob_start_len)
        return self.cache.match(request.prompt_ids + request.output_ids, limit)

    def start(self, request: Request, entry: CacheEntry | None) -> None:
        """The entry's snapshot into the request's slot (when there is one; its pages are already the request's
        first ones), and where the request's own entry will be taken."""
        if entry is not None:
            self.cache.restore(entry, request.slot)
            request.num_computed = request.cached_tokens = entry.num_tokens
            request.restored_from = entry.key
        self.cache.stats.miss_tokens += request.num_known - request.num_computed
        at = self.cache.boundary(request.num_known)
        request.cache_at = at if at > request.num_computed else None

    def restore_reserved(self, request: Request) -> int:
        """A reserved request whose prompt is known now (the colocated worker's): restore its longest cached
        prefix into the slot and pages it holds (the entry's pages replace its first ones); the tokens
        restored."""
        if not self.cacheable(request) or request.slot is None:
            return 0
        entry = self.lookup(request)
        if entry is not None:
            k = len(entry.pages)
            self.pools.pages.share(list(entry.pages))
            self.pools.pages.free(request.pages[:k])
            request.pages[:k] = list(entry.pages)
        self.start(request, entry)
        return request.cached_tokens

    def after_forward(self, request: Request) -> None:
        """The request's forward has been queued: when it reached the request's entry point, take the entry
        (stream-ordered after that forward)."""
        if request.cache_at is not None and request.num_computed == request.cache_at:
            known = request.prompt_ids + request.output_ids
            self.cache.insert(known[: request.cache_at], request.pages, request.slot, request.restored_from)
            request.cache_at = None
