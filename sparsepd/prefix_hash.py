"""Names of page-aligned token prefixes, the same in every process (engine/prefix_cache.py keys its entries by
them; the router matches a request against what each prefill worker reports holding).

`prefix_hashes(ids, page_size)[k]` names `ids[: (k + 1) · page_size]`: a chain, each page's hash taken over the
previous one and the page's token ids, so one pass over a prompt names all its page-aligned prefixes. 64-bit
BLAKE2b: stable across processes and machines (Python's `hash` of bytes is salted per process).
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

_SEED = b"sparsepd-prefix-v1"


def prefix_hashes(ids: Sequence[int], page_size: int, limit: int | None = None) -> list[int]:
    """The hashes of ids' page-aligned prefixes, shortest first (at most `limit` tokens' worth when given)."""
    if page_size < 1:
        raise ValueError(f"page_size must be ≥ 1, got {page_size}")
    n = len(ids) if limit is None else min(len(ids), limit)
    out, previous = [], _SEED
    for start in range(0, n - n % page_size, page_size):
        digest = hashlib.blake2b(previous + array("q", ids[start: start + page_size]).tobytes(), digest_size=8)
        previous = digest.digest()
        out.append(int.from_bytes(previous, "little"))
    return out


def longest_match(hashes: Sequence[int], held: set[int] | frozenset[int]) -> int:
    """How many of the first pages of a request whose prefix hashes are `hashes` a holder of `held` has (the
    longest prefix it names)."""
    for k in range(len(hashes), 0, -1):
        if hashes[k - 1] in held:
            return k
    return 0
