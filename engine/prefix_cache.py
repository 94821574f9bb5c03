"""Prefix caching over compressed state (docs/DESIGN.md §9): a radix tree at page granularity. Any page-aligned
prefix an earlier request computed can be restored, whether or not it was that request's whole prompt, and
branches share their common pages.

What a restore at a page boundary p needs (engine/state_io.py): the committed compressed and indexer rows of
positions < p, in the first p/page pages, immutable once written; and the request's slot state at p: the SWA
ring (the last `window` positions: with the page equal to the window, the rows of the page before p) and the
compressor and indexer rings (CSA's carried half-block). So the tree keeps:

- per node (one page of tokens, keyed by the hash of the prefix it ends: sparsepd/prefix_hash.py, the names
  the router matches against) that page, by reference (the page allocator counts holders; a shared page is
  never written again: positions ≥ p land in later pages);
- per node where a restore may happen, a **boundary snapshot**: the slot state at the node's end, in one of the
  pools' snapshot slots (engine/pools.py: slots past the requests' ones, counted in the memory plan).

Snapshots are taken while a request's prefill computes the boundary (engine/prefix_restore.py): the forward's
ring writes also go to the snapshot slot (engine/batch.py's capture rows), so a chunk is never cut at a
boundary and a snapshot costs no extra forward. A hit shares the path's pages and copies the deepest snapshot
on the path into the new request's slot: exactly the state its own prefill would have built there.

A **host tier** (`host_bytes` > 0, `--prefix-cache-host-bytes`; SGLang's HiCache idea): a snapshot evicted
from its slot for a newer boundary moves to pinned host memory instead (a stream-ordered copy, no sync), within
`host_bytes`, least recently used going first; its node and page stay on the device. A hit there copies the
snapshot from host memory straight into the request's slot: one slot's bytes, always cheaper than computing
the page before the boundary again. Page pressure evicts host-tier leaves before device ones.

Eviction, two kinds: a snapshot (a restore point) goes least recently used first when a new boundary needs a
slot — except that a snapshot a request was restored from goes first once that request's own snapshot extends
it along a path that does not branch there (a conversation resends its latest turn, not an earlier one); and
under page pressure, before any admission fails (`make_room`), whole leaves go, least recently used first: a
cache never refuses a request an empty cache would take. A node that holds no snapshot and has no children
is pruned at once (every leaf holds a snapshot). Evicting drops the tree's holds only: pages a running request
still holds stay.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from sparsepd.engine.pools import KVPools, bytes_per_page, bytes_per_slot
from sparsepd.engine.state_io import slot_views
from sparsepd.prefix_hash import prefix_hashes


@dataclass(eq=False)
class Node:
    key: int  # prefix_hashes(tokens up to its end)[-1]; 0 for the root
    depth: int  # pages from the root: the node ends at token depth · page_size
    page: int  # the page of its tokens' compressed and indexer rows (-1 for the root)
    parent: Node | None = field(repr=False)
    children: dict[int, Node] = field(default_factory=dict, repr=False)  # by key
    snapshot: int | None = None  # the pools' snapshot slot holding the state at its end (None: pages only)
    # or its host-tier copy (slot views' names → host tensors)
    host: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def restorable(self) -> bool:
        return self.snapshot is not None or self.host is not None


@dataclass(frozen=True)
class Hit:
    """Where a request restores from: the deepest node with a snapshot on its path."""

    key: int
    num_tokens: int  # a multiple of the page size
    pages: tuple[int, ...]  # the path's pages, root first
    snapshot: int | None  # the snapshot slot (device tier)
    host: dict[str, torch.Tensor] | None = None  # the host-tier copy, when not on the device


@dataclass
class CacheStats:
    hit_tokens: int = 0  # prompt tokens restored instead of computed
    miss_tokens: int = 0  # prompt tokens computed by requests that looked the cache up
    hits: int = 0
    lookups: int = 0
    inserts: int = 0  # boundary snapshots taken
    evictions: int = 0  # boundary snapshots dropped
    page_evictions: int = 0  # nodes removed (their page's hold dropped)
    host_hit_tokens: int = 0  # of hit_tokens: restored from the host tier
    host_inserts: int = 0  # snapshots moved from their slot to host memory
    host_evictions: int = 0  # host-tier snapshots dropped


class PrefixCache:
    def __init__(self, pools: KVPools, max_entries: int, host_bytes: int = 0):
        """max_entries: boundary snapshots kept at once (the pools' snapshot slots; a slot's bytes each);
        host_bytes: host memory for snapshots evicted from their slots (0: no host tier)."""
        if host_bytes < 0:
            raise ValueError(f"host_bytes must be ≥ 0, got {host_bytes}")
        if max_entries < 1:
            raise ValueError(f"a prefix cache needs max_entries ≥ 1, got {max_entries}")
        if max_entries > pools.snapshots.capacity:
            raise ValueError(f"max_entries={max_entries} exceeds the pools' {pools.snapshots.capacity} snapshot slots "
                             "(PoolConfig.prefix_cache_entries sizes them)")
        self.pools, self.max_entries = pools, max_entries
        self.page_size = pools.geometry.page_size
        self.root = Node(0, 0, -1, None)
        self.nodes: dict[int, Node] = {}  # key → node, every node but the root
        self.lru: OrderedDict[int, Node] = OrderedDict()  # nodes with a snapshot, least recently used first
        self.host_bytes = host_bytes
        self.host_lru: OrderedDict[int, Node] = OrderedDict()  # nodes with a host-tier snapshot, the same order
        self.host_used = 0  # bytes of the host tier's snapshots
        self.stats = CacheStats()

    # --- lookups -----------------------------------------------------------------------------------
    def match(self, tokens: Sequence[int], limit: int) -> Hit | None:
        """The deepest restore point on the path of tokens[:limit] (marked recently used), or None."""
        self.stats.lookups += 1
        node, best = self.root, None
        for key in prefix_hashes(tokens, self.page_size, limit):
            node = node.children.get(key)
            if node is None:
                break
            if node.restorable:
                best = node
        if best is None:
            return None
        (self.lru if best.snapshot is not None else self.host_lru).move_to_end(best.key)
        return Hit(best.key, best.depth * self.page_size, tuple(self.path_pages(best)), best.snapshot, best.host)

    def path_pages(self, node: Node) -> list[int]:
        pages = []
        while node is not self.root:
            pages.append(node.page)
            node = node.parent
        return pages[::-1]

    def restore(self, hit: Hit, slot: int) -> None:
        """Copy the hit's snapshot into `slot` (the caller already holds the hit's pages: they become the new
        holder's first pages)."""
        if hit.snapshot is not None:
            copy_slot(self.pools, hit.snapshot, slot)
        else:
            for name, (pool, _) in slot_views(self.pools, slot).items():
                pool[slot].copy_(hit.host[name], non_blocking=True)
            self.stats.host_hit_tokens += hit.num_tokens
        self.stats.hits += 1
        self.stats.hit_tokens += hit.num_tokens

    def boundary(self, num_known: int) -> int:
        """The last boundary a request of num_known known tokens snapshots: the last page boundary at or before
        their end (0: none). (A conversation's next turn resends them and more: it restores there.)"""
        return num_known // self.page_size * self.page_size

    def has_snapshot(self, key: int) -> bool:
        node = self.nodes.get(key)
        return node is not None and node.restorable

    # --- inserts -------------------------------------------------------------------------------------
    def take_slot(self, keep: set[int]) -> int | None:
        """A snapshot slot for a new boundary: a free one, else the least recently used snapshot's (not one of
        `keep`, the slots this forward already writes); None when every slot is taken by `keep`."""
        if self.pools.snapshots.num_free and len(self.lru) < self.max_entries:
            return self.pools.snapshots.allocate(1)[0]
        for node in self.lru.values():
            if node.snapshot not in keep:
                self._to_host(node)
                return self.pools.snapshots.allocate(1)[0]
        return None

    def insert(self, hashes: Sequence[int], pages: Sequence[int], snapshot: int, superseded: int | None = None) -> None:
        """Make the prefix named by hashes (one per page, root first) a restore point whose state is in
        `snapshot` (a slot from `take_slot`, written by the forward that computed the boundary): nodes created
        along the path hold the request's pages by reference. `superseded`: the key of the node the request
        was restored from; when the new snapshot extends it along a path that does not branch there, it goes
        first when a slot is needed."""
        node = self.root
        for depth, key in enumerate(hashes, start=1):
            child = node.children.get(key)
            if child is None:
                page = pages[depth - 1]
                self.pools.pages.share([page])
                child = node.children[key] = self.nodes[key] = Node(key, depth, page, node)
            node = child
        if node.restorable:  # taken meanwhile (two requests with this prefix in one forward)
            self.pools.snapshots.free([snapshot])
            self.lru.move_to_end(node.key)
            return
        node.snapshot = snapshot
        self.lru[node.key] = node
        self.stats.inserts += 1
        old = self.nodes.get(superseded) if superseded is not None else None
        if old is not None and old.snapshot is not None and old is not node and len(old.children) == 1:
            self.lru.move_to_end(old.key, last=False)

    # --- memory ----------------------------------------------------------------------------------------
    def make_room(self, num_pages: int) -> None:
        """Evict least recently used leaves (the host tier's first) until num_pages pages are free, or the tree
        is empty."""
        while (self.lru or self.host_lru) and not self.pools.pages.can_allocate(num_pages):
            leaf = next((n for n in (*self.host_lru.values(), *self.lru.values()) if not n.children), None)
            if leaf is None:  # unreachable while every leaf holds a snapshot
                raise AssertionError("prefix cache: no leaf among the snapshot nodes")
            self._drop_snapshot(leaf)

    def clear(self) -> None:
        while self.lru or self.host_lru:
            self._drop_snapshot(next(iter((*self.host_lru.values(), *self.lru.values()))))

    def _to_host(self, node: Node) -> None:
        """Evict a node's snapshot from its slot: into the host tier when it fits there (dropping that tier's least
        recently used ones), else gone."""
        need = bytes_per_slot(self.pools.cfg)
        if need > self.host_bytes:
            self._drop_snapshot(node)
            return
        while self.host_used + need > self.host_bytes:
            self._drop_snapshot(next(iter(self.host_lru.values())))
        pin = self.pools.device.type == "cuda"
        host = {}
        for name, (pool, _) in slot_views(self.pools, node.snapshot).items():
            piece = pool[node.snapshot]
            host[name] = torch.empty(piece.shape, dtype=piece.dtype, pin_memory=pin)
            host[name].copy_(piece, non_blocking=pin)  # stream-ordered before the slot is written again
        del self.lru[node.key]
        self.pools.snapshots.free([node.snapshot])
        node.snapshot, node.host = None, host
        self.host_lru[node.key] = node
        self.host_used += need
        self.stats.evictions += 1
        self.stats.host_inserts += 1

    def _drop_snapshot(self, node: Node) -> None:
        """Drop a node's snapshot (either tier) and prune what no restore needs any more."""
        if node.snapshot is not None:
            del self.lru[node.key]
            self.pools.snapshots.free([node.snapshot])
            node.snapshot = None
            self.stats.evictions += 1
        else:
            del self.host_lru[node.key]
            node.host = None
            self.host_used -= bytes_per_slot(self.pools.cfg)
            self.stats.host_evictions += 1
        while node is not self.root and not node.children and not node.restorable:  # prune what no restore needs
            parent = node.parent
            del parent.children[node.key]
            del self.nodes[node.key]
            self.pools.pages.free([node.page])
            self.stats.page_evictions += 1
            node = parent

    # --- what a worker reports ----------------------------------------------------------------------------
    def held_pages(self) -> dict[int, int]:
        """page → how many nodes hold it (one). (Read by a worker's Stats beside the thread that steps the engine:
        the copy of the map is taken whole under the GIL.)"""
        return {node.page: 1 for node in list(self.nodes.values())}

    def reclaimable_pages(self) -> int:
        """Pages only the tree holds: free once their nodes are evicted (counted as free in a worker's Stats)."""
        return sum(1 for page in self.held_pages() if self.pools.pages.refs(page) == 1)

    def hashes(self, limit: int = 8192) -> list[int]:
        """The keys of the restore points, the device tier's then the host tier's, most recently used first, at
        most `limit` (what a worker reports to the router: the longest of a request's prefix hashes among them
        is where this worker would restore it; 8 bytes each in every Stats)."""
        return [*reversed(list(self.lru)), *reversed(list(self.host_lru))][:limit]

    @property
    def num_snapshots(self) -> int:
        return len(self.lru)

    @property
    def num_host_snapshots(self) -> int:
        return len(self.host_lru)

    def num_bytes(self) -> int:
        """Device bytes the cache holds: its snapshots and the pages only it holds."""
        cfg = self.pools.cfg
        return self.num_snapshots * bytes_per_slot(cfg) + self.reclaimable_pages() * bytes_per_page(cfg)


def copy_slot(pools: KVPools, source: int, target: int) -> None:
    """Copy one slot's state (SWA ring, compressor and indexer rings) into another, on the device."""
    for pool, _ in slot_views(pools, 0).values():
        pool[target] = pool[source]
