"""One bound on the host memory an engine keeps states in: retracted requests' states (engine/page_growth.py) and
the prefix cache's host tier (engine/prefix_cache.py: snapshots and pages evicted from the device).

With a host tier (`--prefix-cache-host-bytes` B > 0) both draw on B: a retraction that does not fit first evicts
host-tier cache entries, least recently used first, and fails as a retraction past the bound does (the newest
decoding request ends RESOURCE_EXHAUSTED) only when the whole tier is gone and it still does not fit; retracted
states alone never take more than `--max-retracted-memory` (default: all of B). Without a host tier the bound is
`--max-retracted-memory` alone (default: the KV pool's size), as retracted states are the only ones kept.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch


@dataclass
class HostMemory:
    limit: int  # bytes of host memory for retracted states and the cache's host tier together
    retracted_limit: int  # of those, at most this for retracted states
    retracted: int = 0  # bytes retracted requests' states take now
    cached: int = 0  # bytes the prefix cache's host tier takes now

    def __post_init__(self):
        if self.limit < 0 or self.retracted_limit < 0:
            raise ValueError(f"host memory bounds must be ≥ 0, got {self.limit} and {self.retracted_limit}")
        self.retracted_limit = min(self.retracted_limit, self.limit)

    @classmethod
    def for_engine(cls, host_tier_bytes: int, max_retracted_bytes: int | None, pool_bytes: int) -> HostMemory:
        """The bound the flags give (see the module's docstring): host_tier_bytes is the cache's host tier (0:
        none); max_retracted_bytes None means the default."""
        if host_tier_bytes:
            return cls(host_tier_bytes, host_tier_bytes if max_retracted_bytes is None else max_retracted_bytes)
        bound = pool_bytes if max_retracted_bytes is None else max_retracted_bytes
        return cls(bound, bound)

    @property
    def free(self) -> int:
        return self.limit - self.retracted - self.cached

    @classmethod
    def unbounded(cls) -> HostMemory:
        return cls(sys.maxsize, sys.maxsize)

    def describe(self) -> str:
        return (f"{self.retracted} bytes of retracted states and {self.cached} of the prefix cache's host tier in a "
                f"bound of {self.limit} (retracted states at most {self.retracted_limit})")


def state_bytes(tensors: dict[str, torch.Tensor] | None) -> int:
    """Host bytes of a state's tensors (a retracted request's `offloaded`; 0 for None)."""
    return sum(t.nbytes for t in tensors.values()) if tensors else 0
