"""Pages on demand: a running request gets the page its next token's KV goes to as it decodes across a page
boundary; when none is free, the newest decoding requests are retracted (state to host memory, back to the head
of the waiting queue) and resumed with the same tokens when admitted again (engine/admission.py)."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable

from sparsepd.engine.admission import Admission
from sparsepd.engine.host_memory import HostMemory, state_bytes
from sparsepd.engine.pools import KVPools, OutOfCapacity
from sparsepd.engine.prefix_cache import PrefixCache
from sparsepd.engine.request import Request, StepOutput
from sparsepd.engine.state_io import export_state, state_num_bytes

log = logging.getLogger("sparsepd.engine")


class PageGrowth:
    def __init__(self, pools: KVPools, cache: PrefixCache | None, admission: Admission, host: HostMemory):
        """host: the bound retracted states share with the prefix cache's host tier (engine/host_memory.py)."""
        self.pools, self.cache, self.admission, self.host = pools, cache, admission, host
        self.retractions = 0  # requests moved back to waiting (state to host memory) for want of a page

    def ensure_pages(self, request: Request, num_tokens: int) -> None:
        """Pages for the request's first num_tokens positions (raises OutOfCapacity, holding what it held)."""
        need = self.pools.pages_for(num_tokens) - len(request.pages)
        if need > 0:
            if self.cache is not None:
                self.cache.make_room(need)
            request.pages += self.pools.pages.allocate(need)

    def grow(self, running: list[Request], waiting: deque[Request],
             read_in_flight: Callable[[], list[StepOutput] | None]) -> list[StepOutput]:
        """Every request about to decode gets the page its next token's KV goes to. When none is free: read the
        step in flight (`read_in_flight`: its outputs, None when no step is in flight; its finished requests free
        their pages), then retract the newest decoding requests (`retract`) until the page is there; a request
        alone in a full pool fails (finish "error"). Returns the outputs read early."""
        read_early: list[StepOutput] = []
        page = self.pools.geometry.page_size
        for r in list(running):  # oldest first
            if len(r.pages) * page > r.num_computed:  # its next token's page is there (most steps): nothing to do
                continue
            # A request retracted or failed in this loop has no slot any more, one finished by reading the step in
            # flight has its finish reason: no membership test on `running` (O(batch) each, O(batch²) a step).
            while r.finish_reason is None and not r.prefilling and r.slot is not None \
                    and len(r.output_ids) + r.num_pending < r.params.max_new_tokens:
                try:
                    self.ensure_pages(r, r.num_computed + 1)
                    break
                except OutOfCapacity:
                    pass
                outputs = read_in_flight()
                if outputs is not None:
                    read_early += outputs
                    continue
                victim = next((v for v in reversed(running) if v is not r and not v.prefilling and not v.forks
                               and v.finish_reason is None and v.slot is not None), None)
                if victim is None:
                    r.finish_reason = "error"
                    r.error = (f"request {r.request_id}: no KV page free for position {r.num_computed} and nothing "
                               f"to retract (the pool holds {self.pools.pages.capacity} pages)")
                    read_early.append(StepOutput(r.request_id, -1, "error", error=r.error))
                    self.admission.release(r)
                    running.remove(r)
                    break
                read_early += self.retract(victim, running, waiting)
        return read_early

    def retract(self, request: Request, running: list[Request], waiting: deque[Request]) -> list[StepOutput]:
        """Move a decoding request back to the head of the waiting queue: its state copied to host memory, its
        slot and pages freed; admitted again, it gets them back with the state and goes on with its next token
        (nothing repeated or lost, its random stream where it was). Its state counts against the host memory it
        shares with the prefix cache's host tier (engine/host_memory.py): the tier's entries go first, least
        recently used first, to make room; when it still does not fit (or retracted states would pass their own
        bound) it fails instead (finish "error", `overloaded`): the newest decoding request, as the one retracted
        would be, rather than memory without bound."""
        num_bytes, host = state_num_bytes(self.pools, request), self.host
        fits_own = host.retracted + num_bytes <= host.retracted_limit
        if fits_own and num_bytes > host.free and self.cache is not None:
            self.cache.free_host(num_bytes)
        if not fits_own or num_bytes > host.free:
            request.finish_reason, request.error = "error", (
                f"request {request.request_id}: no KV page free for position {request.num_computed}, and retracting "
                f"it ({num_bytes} bytes of state) would take host memory over the bound of {host.retracted_limit} "
                f"bytes for retracted states or {host.limit} in all (--max-retracted-memory, "
                f"--prefix-cache-host-bytes): {host.describe()}")
            log.warning("failed instead of retracted: %s", request.error, extra={"request_id": request.request_id})
            self.admission.release(request)
            running.remove(request)
            return [StepOutput(request.request_id, -1, "error", error=request.error, overloaded=True)]
        _, request.offloaded = export_state(self.pools, request)
        host.retracted += state_bytes(request.offloaded)
        self.admission.release(request)
        running.remove(request)
        waiting.appendleft(request)
        self.retractions += 1
        log.warning("retracted after %d tokens: no KV page free; its state waits in host memory",
                    len(request.output_ids), extra={"request_id": request.request_id})
        return []
