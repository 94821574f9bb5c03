"""Where the router sends work: a decode worker for each reservation, a prefill worker for each batch.

The workers' own numbers (Stats, polled every `poll_s`) are late: reservations made between two polls all
see the same numbers, so a burst used to land on one worker. The router therefore counts what it has asked
for and the worker has not reported yet (`WorkerHandle.hold` → `confirm` → dropped by the first poll whose
Stats was asked for after the worker confirmed) and chooses on that view:

- decode: first the workers that can hold the request by that view (a free slot and the pages its state
  fills: prompt, tokens already streamed when it moved, and the next one; decode workers add pages as
  requests grow, engine/scheduler.py), least loaded first (the larger of the shares of slots and pages in use), ties in
  round-robin order; then the rest, the same way (the view may be stale: the worker's Reserve decides).
- prefill: the worker whose prefix cache holds the longest prefix of the request at the queue's head, when
  that is a fair share of its prompt and the worker is not far behind the others (`cached_prefill`; the
  batch then takes the queued requests that prefer no other worker); else the fewest prompt tokens queued
  (counted when a batch is sent), ties in round-robin order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from sparsepd.prefix_hash import longest_match


class Worker(Protocol):
    role: str
    index: int
    alive: bool
    queued_tokens: int
    cached: frozenset[int]  # a prefill worker's prefix-cache entries (their hashes), as its last Stats said

    @property
    def free_pages(self) -> int: ...

    @property
    def free_slots(self) -> int: ...

    @property
    def num_pages(self) -> int: ...

    @property
    def num_slots(self) -> int: ...


CACHE_MATCH_SHARE = 0.25  # a cached prefix below this share of the prompt does not pick the prefill worker


class Placement:
    """The policy, with its round-robin position per role (the index after the last worker chosen)."""

    def __init__(self, page_size: int):
        if page_size < 1:
            raise ValueError(f"page_size must be ≥ 1, got {page_size}")
        self.page_size = page_size
        self.turn = {"prefill": 0, "decode": 0}

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def prefill(self, workers: Sequence[Worker]) -> Worker | None:
        """The live prefill worker with the fewest queued tokens (ties: round robin); None if none is alive."""
        live = [w for w in workers if w.alive]
        return min(live, key=lambda w: (w.queued_tokens, self._rotation(w))) if live else None

    def cached_prefill(self, workers: Sequence[Worker], hashes: Sequence[int], num_tokens: int,
                       balance_tokens: int) -> Worker | None:
        """Cache-aware prefill choice (SGLang's router policy): the live worker whose prefix cache holds the
        longest page-aligned prefix of the request (`hashes`, sparsepd/prefix_hash.py), when that prefix is at
        least CACHE_MATCH_SHARE of its num_tokens and the worker's queue is at most balance_tokens longer than
        the shortest one; None otherwise (then the least loaded worker takes it)."""
        live = [w for w in workers if w.alive]
        if not live or not hashes:
            return None
        best = max(live, key=lambda w: (longest_match(hashes, w.cached), -w.queued_tokens))
        matched = longest_match(hashes, best.cached) * self.page_size
        if matched == 0 or matched < CACHE_MATCH_SHARE * num_tokens:
            return None
        if best.queued_tokens > min(w.queued_tokens for w in live) + balance_tokens:
            return None  # overloaded: the cache is not worth the wait
        return best

    def decode(self, workers: Sequence[Worker], num_tokens: int) -> list[Worker]:
        """Live decode workers in the order to try them for a request whose state fills num_tokens."""
        need = self.pages_for(num_tokens)
        live = [w for w in workers if w.alive]
        return sorted(live, key=lambda w: (not _fits(w, need), _load(w), self._rotation(w)))

    def chose(self, worker: Worker) -> None:
        """Note the worker work was sent to: the next tie goes to the one after it."""
        self.turn[worker.role] = worker.index + 1

    def _rotation(self, w: Worker) -> tuple[bool, int]:
        """Round-robin order: workers from the turn on, then those before it."""
        return w.index < self.turn[w.role], w.index


def _fits(w: Worker, need_pages: int) -> bool:
    return w.free_slots >= 1 and w.free_pages >= need_pages


def _load(w: Worker) -> float:
    slots = 1 - w.free_slots / w.num_slots if w.num_slots else 1.0
    pages = 1 - w.free_pages / w.num_pages if w.num_pages else 1.0
    return max(slots, pages)
