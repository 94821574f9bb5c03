"""Admission: which waiting requests get a slot and pages now, and what they get.

A request is admitted with the pages of its known tokens and the next one (`initial_pages`) while the admission
leaves one free page per decoding request for their growth (`headroom`); with a prefix cache, its longest cached
prefix is restored into the slot and pages it gets (engine/prefix_restore.py); a retracted request gets its state
back from host memory. `reserve` is the same without running the request: the decode worker's reservation.
"""

from __future__ import annotations

from collections import deque

from sparsepd.engine.host_memory import HostMemory, state_bytes
from sparsepd.engine.pools import KVPools, OutOfCapacity
from sparsepd.engine.prefix_cache import PrefixCache
from sparsepd.engine.prefix_restore import PrefixRestore
from sparsepd.engine.request import Request
from sparsepd.engine.state_io import restore_tensors


class Admission:
    def __init__(self, pools: KVPools, cache: PrefixCache | None, prefix: PrefixRestore | None,
                 host: HostMemory | None = None):
        """host: where retracted states are counted (engine/host_memory.py)."""
        self.pools, self.cache, self.prefix = pools, cache, prefix
        self.host = host or HostMemory.unbounded()

    def check(self, request: Request, max_seq_len: int) -> None:
        """Raise ValueError if the request is malformed, OutOfCapacity if it could never fit these pools."""
        if not request.prompt_ids:
            raise ValueError(f"request {request.request_id}: empty prompt")
        if request.max_len > max_seq_len:
            raise ValueError(f"request {request.request_id}: prompt {len(request.prompt_ids)} + max_new_tokens "
                             f"{request.params.max_new_tokens} exceeds max_seq_len={max_seq_len}")
        need = to_reserve(request)
        pages = sum(self.pools.pages_for(r.max_len) for r in need)  # all it may grow to: then it can never finish
        if pages > self.pools.pages.capacity or len(need) > self.pools.slots.capacity:
            raise OutOfCapacity(f"request {request.request_id} needs {pages} pages and {len(need)} slots, the pools "
                                f"have {self.pools.pages.capacity} and {self.pools.slots.capacity}")

    def initial_pages(self, request: Request) -> int:
        """Pages a request gets when it is admitted: its known tokens and the next one (a prefill, then its first
        decode step; a retracted request's state and its next step). Decoding adds one page at each page
        boundary (engine/page_growth.py)."""
        return self.pools.pages_for(request.num_known + 1)

    @staticmethod
    def headroom(running: list[Request]) -> int:
        """Free pages an admission leaves for the running set's growth: one per decoding request (each crosses a
        page boundary at least once every page_size steps), so that retraction stays rare."""
        return sum(1 for r in running if not r.prefilling and r.finish_reason is None)

    def admit_waiting(self, waiting: deque[Request], running: list[Request]) -> None:
        """Admit waiting requests, oldest first, while their slots and pages (and the headroom) fit."""
        if not waiting:  # (the headroom count walks the running set: not when nothing waits)
            return
        headroom = self.headroom(running)  # counted once: an admitted request adds to it only when it resumes decoding
        while waiting:
            request = waiting[0]
            need = to_reserve(request)
            pages = sum(self.initial_pages(r) for r in need) + headroom
            if self.cache is not None and self.pools.slots.can_allocate(len(need)):
                self.cache.make_room(pages)
            if not (self.pools.slots.can_allocate(len(need)) and self.pools.pages.can_allocate(pages)):
                return
            waiting.popleft()
            self.admit(request, running)
            headroom += not request.prefilling  # a retracted request resumes decoding at once

    def admit(self, request: Request, running: list[Request]) -> None:
        """Give a request (and its forks) a slot and pages for all its tokens and make it run (raises
        OutOfCapacity)."""
        done = []
        try:
            for r in to_reserve(request):
                self.reserve(r)
                done.append(r)
        except OutOfCapacity:
            for r in done:
                self.release(r)
            raise
        running.append(request)

    def reserve(self, request: Request, headroom: int = 0, lookup: bool = True) -> None:
        """A slot and its initial pages (`initial_pages`) for a request, without running it (raises OutOfCapacity,
        also when fewer than `headroom` pages would be left); with a prefix cache, its longest cached prefix
        restored (the cached pages shared, the boundary state copied into its slot; not when `lookup` is False: a
        reservation whose prompt comes later, `PrefixRestore.restore_reserved`); a retracted request's state
        copied back."""
        if self.pools.pages_for(request.max_len) > self.pools.pages.capacity:
            raise OutOfCapacity(f"request {request.request_id} may grow to {self.pools.pages_for(request.max_len)} "
                                f"pages, the pool has {self.pools.pages.capacity} in all")
        slot = self.pools.slots.allocate(1)[0]
        hit = self.prefix.lookup(request) if lookup and self.prefix is not None else None
        shared = list(hit.pages) if hit is not None else []
        self.pools.pages.share(shared)  # before make_room: evicting the cached prefix now frees none of these
        need = self.initial_pages(request) - len(shared)
        try:
            if self.cache is not None:
                self.cache.make_room(need + headroom)
            if headroom and not self.pools.pages.can_allocate(need + headroom):
                raise OutOfCapacity(f"needs {need} pages and leaves {headroom} for the running requests' growth; "
                                    f"{self.pools.pages.num_free} of {self.pools.pages.capacity} are free")
            request.pages = shared + self.pools.pages.allocate(need)
        except OutOfCapacity:
            self.pools.pages.free(shared)
            self.pools.slots.free([slot])
            raise
        request.slot = slot
        self.pools.reset_slot(slot)
        if request.offloaded is not None:  # retracted: its state back from host memory
            restore_tensors(self.pools, request, request.offloaded)
            self.forget_offloaded(request)
            return
        if lookup and self.prefix is not None and self.prefix.cacheable(request):
            self.prefix.start(request, hit)

    def forget_offloaded(self, request: Request) -> None:
        """A retracted request's host state is no longer needed (restored, or the request aborted while waiting)."""
        self.host.retracted -= state_bytes(request.offloaded)
        request.offloaded = None

    def release(self, request: Request) -> None:
        """Free a request's slot and pages (a reservation that never ran, or any request)."""
        if request.slot is not None:
            self.pools.slots.free([request.slot])
            request.slot = None
        if request.pages:
            self.pools.pages.free(request.pages)
            request.pages = []


def to_reserve(request: Request) -> list[Request]:
    """The request and those of its forks that need a slot and pages here and hold none yet."""
    return [request, *(f for f in request.forks if f.slot is None and not f.stateless)]
