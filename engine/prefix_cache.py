"""Prefix caching over compressed state (docs/DESIGN.md §9): a radix tree at page granularity. Any page-aligned
prefix an earlier request computed can be restored, whether or not it was that request's whole prompt, and
branches share their common pages.

What a restore at a page boundary p needs (engine/state_io.py): the committed compressed and indexer rows of
positions < p, in the first p/page pages, immutable once written; and the request's slot state at p, slimmed to
what is read again (engine/snapshot_store.py): the SWA ring (with the page equal to the window, the rows of the
page before p) and the carried half-block of the CSA compressor and indexer rings. So the tree keeps:

- per node (one page of tokens, keyed by the hash of the prefix it ends: sparsepd/prefix_hash.py, the names
  the router matches against) that page, by reference (the page allocator counts holders; a shared page is
  never written again: positions ≥ p land in later pages);
- per node where a restore may happen, a **boundary snapshot**: the slim slot state at the node's end, an entry
  of the pools' snapshot store (`bytes_per_snapshot`), evictable apart from the node's page.

Snapshots are taken while a request's prefill computes the boundary (engine/prefix_restore.py): the forward's
ring writes also go to a capture slot (engine/batch.py's capture rows), so a chunk is never cut at a boundary
and a snapshot costs no extra forward; after the forward the pieces a restore reads are saved into a store entry
and the capture slot is free again. A hit shares the path's pages and loads the deepest snapshot on the path into
the new request's slot: exactly the state its own prefill would have built there.

A **host tier** (`host` given: `--prefix-cache-host-bytes`; SGLang's HiCache idea) within the bound it shares
with retracted requests' states (engine/host_memory.py), least recently used going first:
- a snapshot evicted from the store for a newer boundary moves to (pinned) host memory;
- a page evicted under page pressure (a node none of whose children holds a device page) moves there too, its
  node staying in the tree, so a tree's host pages are the ends of its paths.
A hit whose restore point needs host bytes (its snapshot, or pages on its path) copies them back (pages into
fresh device pages, the node holding them again) when that is cheaper than computing the tokens it adds over the
deepest restore point that needs no copy: `host bytes / copy_bytes_per_s ≤ added tokens / prefill_tokens_per_s`
(defaults 16 GB/s and 10,000 tokens/s: on `bench` a page is 47 KB, 3 µs to copy, against 12.8 ms to compute its
128 tokens, so a host hit wins there by far; the rule matters for slow links or a device busy elsewhere).

Eviction: a snapshot goes least recently used first when a new boundary needs a store entry — except that a
snapshot a request was restored from goes first once that request's own snapshot extends it along a path that
does not branch there (a conversation resends its latest turn, not an earlier one); under page pressure, before
any admission fails (`make_room`), pages go least recently used first, from nodes none of whose children holds a
device page (to the host tier, else the node and what hangs below it go): a cache never refuses a request an
empty cache would take. A node that holds no snapshot and has no children is pruned at once (every leaf holds a
snapshot). Evicting drops the tree's holds only: pages a running request still holds stay.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from sparsepd.engine.host_memory import HostMemory
from sparsepd.engine.pools import KVPools, bytes_per_page, bytes_per_snapshot
from sparsepd.prefix_hash import prefix_hashes

SNAPSHOT, PAGE = "snapshot", "page"  # the kinds of host-tier items


@dataclass(eq=False)
class Node:
    key: int  # prefix_hashes(tokens up to its end)[-1]; 0 for the root
    depth: int  # pages from the root: the node ends at token depth · page_size
    page: int  # the device page of its tokens' compressed and indexer rows (-1: the root, or the page is on the host)
    parent: Node | None = field(repr=False)
    children: dict[int, Node] = field(default_factory=dict, repr=False)  # by key
    snapshot: int | None = None  # the snapshot store's entry holding the state at its end (None: none on the device)
    host: dict[str, torch.Tensor] | None = field(default=None, repr=False)  # or its host-tier copy
    host_page: dict[str, torch.Tensor] | None = field(default=None, repr=False)  # its page's rows on the host

    @property
    def restorable(self) -> bool:
        return self.snapshot is not None or self.host is not None


@dataclass(frozen=True)
class Hit:
    """Where a request restores from: a node with a snapshot on its path (`PrefixCache.match`)."""

    key: int
    num_tokens: int  # a multiple of the page size
    pages: tuple[int, ...]  # the path's device pages, root first
    snapshot: int | None  # the store entry (device tier)
    host: dict[str, torch.Tensor] | None = None  # the host-tier copy, when not on the device
    from_host: bool = False  # some of it (snapshot or pages) was copied from the host tier


@dataclass
class CacheStats:
    hit_tokens: int = 0  # prompt tokens restored instead of computed
    miss_tokens: int = 0  # prompt tokens computed by requests that looked the cache up
    hits: int = 0
    lookups: int = 0
    inserts: int = 0  # boundary snapshots taken
    evictions: int = 0  # snapshots evicted from the device (to the host tier or gone)
    page_evictions: int = 0  # device pages the tree let go (to the host tier or with their node)
    host_hit_tokens: int = 0  # of hit_tokens: hits that copied something from the host tier
    host_inserts: int = 0  # snapshots moved to the host tier
    host_evictions: int = 0  # host-tier snapshots dropped
    host_page_inserts: int = 0  # pages moved to the host tier
    host_page_restores: int = 0  # host-tier pages copied back to the device for a hit
    host_page_evictions: int = 0  # host-tier pages dropped


class PrefixCache:
    def __init__(self, pools: KVPools, max_entries: int, host: HostMemory | None = None,
                 copy_bytes_per_s: float = 16e9, prefill_tokens_per_s: float = 1e4):
        """max_entries: boundary snapshots kept on the device (the pools' snapshot store); host: the host memory
        of the host tier, shared with retracted states (None: no host tier); copy_bytes_per_s and
        prefill_tokens_per_s: the cost rule of a hit that needs host bytes (the module's docstring)."""
        store = pools.snapshot_store
        if max_entries < 1:
            raise ValueError(f"a prefix cache needs max_entries ≥ 1, got {max_entries}")
        if store is None or max_entries > pools.geometry.num_snapshot_entries:
            raise ValueError(f"max_entries={max_entries} exceeds the pools' {pools.geometry.num_snapshot_entries} "
                             "snapshot entries (PoolConfig.prefix_cache_entries sizes them)")
        if copy_bytes_per_s <= 0 or prefill_tokens_per_s <= 0:
            raise ValueError(f"copy_bytes_per_s and prefill_tokens_per_s must be > 0, got {copy_bytes_per_s}, "
                             f"{prefill_tokens_per_s}")
        self.pools, self.store, self.max_entries, self.host = pools, store, max_entries, host
        self.page_size = pools.geometry.page_size
        self.page_bytes = bytes_per_page(pools.cfg)
        self.copy_bytes_per_s, self.prefill_tokens_per_s = copy_bytes_per_s, prefill_tokens_per_s
        self.free_entries = list(range(max_entries - 1, -1, -1))
        self.root = Node(0, 0, -1, None)
        self.nodes: dict[int, Node] = {}  # key → node, every node but the root
        self.lru: OrderedDict[int, Node] = OrderedDict()  # nodes with a device snapshot, least recently used first
        self.page_lru: OrderedDict[int, Node] = OrderedDict()  # nodes with a device page, the same order
        self.host_lru: OrderedDict[tuple[str, int], Node] = OrderedDict()  # (SNAPSHOT | PAGE, key): the host tier
        self.stats = CacheStats()

    @property
    def snapshot_bytes(self) -> int:
        """One entry's bytes: `bytes_per_snapshot` plus the store's extra parts (the MTP layer's ring)."""
        return bytes_per_snapshot(self.pools.cfg) + self.store.extra_bytes

    # --- lookups -----------------------------------------------------------------------------------
    def match(self, tokens: Sequence[int], limit: int) -> Hit | None:
        """Where tokens[:limit] restore from (marked recently used; host pages on the way copied back to the device
        when the cost rule takes them), or None."""
        self.stats.lookups += 1
        node, path = self.root, []
        for key in prefix_hashes(tokens, self.page_size, limit):
            node = node.children.get(key)
            if node is None:
                break
            path.append(node)
        best, base = self._choose(path)
        if best is not base and not self._promote(path[:best.depth]):
            best = base
        if best is None:
            return None
        for n in reversed(path[:best.depth]):  # deeper ones less recently used than their parents: evicted first
            self.page_lru.move_to_end(n.key)
            if n.host_page is not None:
                self.host_lru.move_to_end((PAGE, n.key))
        if best.snapshot is not None:
            self.lru.move_to_end(best.key)
        else:
            self.host_lru.move_to_end((SNAPSHOT, best.key))
        return Hit(best.key, best.depth * self.page_size, tuple(n.page for n in path[:best.depth]), best.snapshot,
                   best.host, from_host=best.snapshot is None or best is not base)

    def _choose(self, path: list[Node]) -> tuple[Node | None, Node | None]:
        """(the restore point the cost rule picks, the deepest one that needs no host bytes) on a path."""
        base, best, host_bytes, choice = None, None, 0, []
        for node in path:
            host_bytes += self.page_bytes if node.page < 0 else 0
            if node.restorable:
                cost = host_bytes + (self.snapshot_bytes if node.snapshot is None else 0)
                choice.append((node, cost))
                if cost == 0:
                    base = node
        best = base
        base_tokens = base.depth * self.page_size if base is not None else 0
        for node, cost in choice:
            added = node.depth * self.page_size - base_tokens
            if added > 0 and cost / self.copy_bytes_per_s <= added / self.prefill_tokens_per_s:
                best = node
        return best, base

    def _promote(self, path: list[Node]) -> bool:
        """Copy the host pages on a path back into device pages (False, nothing changed, when none are free)."""
        on_host = [n for n in path if n.page < 0]
        if not on_host:
            return True
        self.make_room(len(on_host), protect=set(path))
        if not self.pools.pages.can_allocate(len(on_host)):
            return False
        for node, page in zip(on_host, self.pools.pages.allocate(len(on_host)), strict=True):
            for name, pool in page_parts(self.pools).items():
                pool[page] = node.host_page[name].to(pool.device, non_blocking=True)
            del self.host_lru[(PAGE, node.key)]
            self.host.cached -= self.page_bytes
            node.page, node.host_page = page, None
            self.page_lru[node.key] = node
        self.stats.host_page_restores += len(on_host)
        return True

    def restore(self, hit: Hit, slot: int) -> None:
        """Load the hit's snapshot into `slot`, a fresh one (the caller already holds the hit's pages: they become
        the new holder's first pages)."""
        self.store.load(self.pools, hit.snapshot if hit.snapshot is not None else hit.host, slot, hit.num_tokens)
        self.stats.host_hit_tokens += hit.num_tokens if hit.from_host else 0
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
    def take_slot(self) -> int | None:
        """A capture slot for a boundary the next forward computes (None: all are taken by this forward)."""
        return self.pools.snapshots.allocate(1)[0] if self.pools.snapshots.num_free else None

    def insert(self, hashes: Sequence[int], pages: Sequence[int], slot: int, superseded: int | None = None
               ) -> int | None:
        """Make the prefix named by hashes (one per page, root first) a restore point whose state the forward that
        computed the boundary captured into `slot` (from `take_slot`; free again after this): nodes created along
        the path hold the request's pages by reference (and a node whose page is on the host takes the request's
        page instead). `superseded`: the key of the node the request was restored from; when the new snapshot
        extends it along a path that does not branch there, it goes first when an entry is needed. Returns the
        store entry the snapshot was saved into (None: the prefix was a restore point already)."""
        end = self.nodes.get(hashes[-1])
        entry = None if end is not None and end.restorable else self._take_entry()  # before the walk: may prune
        node = self.root
        for depth, key in enumerate(hashes, start=1):
            child = node.children.get(key)
            if child is None:
                child = node.children[key] = self.nodes[key] = Node(key, depth, -1, node)
            if child.page < 0:
                self.pools.pages.share([pages[depth - 1]])
                child.page = pages[depth - 1]
                self.page_lru[key] = child
                if child.host_page is not None:
                    self._forget_host_page(child)
            node = child
        if entry is None or node.restorable:  # taken meanwhile (two requests with this prefix in one forward)
            if entry is not None:
                self.free_entries.append(entry)
            self.pools.snapshots.free([slot])
            if node.snapshot is not None:
                self.lru.move_to_end(node.key)
            return None
        self.store.save(self.pools, entry, slot, len(hashes) * self.page_size)
        self.pools.snapshots.free([slot])
        node.snapshot = entry
        self.lru[node.key] = node
        self.stats.inserts += 1
        old = self.nodes.get(superseded) if superseded is not None else None
        if old is not None and old.snapshot is not None and old is not node and len(old.children) == 1:
            self.lru.move_to_end(old.key, last=False)
        return entry

    def _take_entry(self) -> int:
        """A free store entry, else the least recently used snapshot's (moved to the host tier, or gone)."""
        if not self.free_entries:
            self._evict_snapshot(next(iter(self.lru.values())))
        return self.free_entries.pop()

    # --- memory ----------------------------------------------------------------------------------------
    def make_room(self, num_pages: int, protect: set[Node] | frozenset = frozenset()) -> None:
        """Evict pages least recently used first (to the host tier when it takes them) until num_pages pages are
        free, or none is left to evict; `protect`: nodes that keep theirs (a path being restored). A page a request
        also holds is not evicted (that frees nothing; the request holds its ancestors' pages too)."""
        pages = self.pools.pages
        while not pages.can_allocate(num_pages):
            node = next((n for n in self.page_lru.values() if n not in protect and pages.refs(n.page) == 1
                         and all(c.page < 0 for c in n.children.values())), None)
            if node is None:
                return
            self._evict_page(node, protect)

    def free_host(self, num_bytes: int) -> None:
        """Drop host-tier items, least recently used first, until num_bytes of the host bound are free or the tier is
        empty (a retraction makes room: engine/page_growth.py)."""
        if self.host is not None:
            self._host_room(num_bytes, frozenset())

    def clear(self) -> None:
        for node in list(self.root.children.values()):
            self._drop_subtree(node)

    def _evict_page(self, node: Node, protect: set[Node] | frozenset) -> None:
        """A node's device page to the host tier when it fits (its node staying), else the node and its subtree go."""
        if not self._host_room(self.page_bytes, protect | {node}):
            self._drop_subtree(node)
            return
        if self.nodes.get(node.key) is not node:  # pruned while the host tier made room
            return
        pin = self.pools.device.type == "cuda"
        node.host_page = {}
        for name, pool in page_parts(self.pools).items():
            piece = pool[node.page]
            node.host_page[name] = torch.empty(piece.shape, dtype=piece.dtype, pin_memory=pin)
            node.host_page[name].copy_(piece, non_blocking=pin)  # stream-ordered before the page is written again
        self.host_lru[(PAGE, node.key)] = node
        self.host.cached += self.page_bytes
        self._drop_device_page(node)
        self.stats.host_page_inserts += 1

    def _evict_snapshot(self, node: Node) -> None:
        """A node's snapshot out of the store: into the host tier when it fits there, else gone."""
        host = self.store.to_host(node.snapshot) if self._host_room(self.snapshot_bytes, {node}) else None
        del self.lru[node.key]
        self.free_entries.append(node.snapshot)
        node.snapshot, node.host = None, host
        self.stats.evictions += 1
        if host is not None:
            self.host_lru[(SNAPSHOT, node.key)] = node
            self.host.cached += self.snapshot_bytes
            self.stats.host_inserts += 1
        else:
            self._prune_up(node)

    def _host_room(self, num_bytes: int, protect: Iterable[Node]) -> bool:
        """Make num_bytes of the host bound free by dropping the host tier's least recently used items (not those of
        `protect`); False when they cannot be (no host tier, or not enough to drop)."""
        if self.host is None or num_bytes > self.host.limit - self.host.retracted:
            return False
        while self.host.free < num_bytes:
            item = next(((kind, n) for (kind, _), n in self.host_lru.items()
                         if n not in protect and (kind == SNAPSHOT or not n.children)), None)
            if item is None:
                return False
            kind, node = item
            if kind == SNAPSHOT:
                self._forget_host_snapshot(node)
                self._prune_up(node)
            else:
                self._drop_subtree(node)
        return True

    def _forget_host_snapshot(self, node: Node) -> None:
        del self.host_lru[(SNAPSHOT, node.key)]
        node.host = None
        self.host.cached -= self.snapshot_bytes
        self.stats.host_evictions += 1

    def _forget_host_page(self, node: Node) -> None:
        del self.host_lru[(PAGE, node.key)]
        node.host_page = None
        self.host.cached -= self.page_bytes
        self.stats.host_page_evictions += 1

    def _drop_device_page(self, node: Node) -> None:
        del self.page_lru[node.key]
        self.pools.pages.free([node.page])
        node.page = -1
        self.stats.page_evictions += 1

    def _drop_subtree(self, node: Node) -> None:
        """Remove a node and everything below it (both tiers), then prune what no restore needs any more."""
        stack, order = [node], []
        while stack:
            n = stack.pop()
            order.append(n)
            stack.extend(n.children.values())
        for n in reversed(order):  # children before their parents
            self._remove(n)
        self._prune_up(node.parent)

    def _remove(self, node: Node) -> None:
        """Unlink a childless node, letting go of its snapshot and page in whichever tier they are."""
        if node.snapshot is not None:
            del self.lru[node.key]
            self.free_entries.append(node.snapshot)
            node.snapshot = None
            self.stats.evictions += 1
        if node.host is not None:
            self._forget_host_snapshot(node)
        if node.page >= 0:
            self._drop_device_page(node)
        if node.host_page is not None:
            self._forget_host_page(node)
        del node.parent.children[node.key]
        del self.nodes[node.key]

    def _prune_up(self, node: Node) -> None:
        while node is not self.root and not node.children and not node.restorable:  # no restore needs it
            parent = node.parent
            self._remove(node)
            node = parent

    # --- what a worker reports ----------------------------------------------------------------------------
    def held_pages(self) -> dict[int, int]:
        """page → how many nodes hold it (one). (Read by a worker's Stats beside the thread that steps the engine:
        the copy of the map is taken whole under the GIL.)"""
        return {node.page: 1 for node in list(self.page_lru.values())}

    def reclaimable_pages(self) -> int:
        """Pages only the tree holds: free once their nodes are evicted (counted as free in a worker's Stats)."""
        return sum(1 for page in self.held_pages() if self.pools.pages.refs(page) == 1)

    def hashes(self, limit: int = 8192) -> list[int]:
        """The keys of the restore points, the device tier's then the host tier's, most recently used first, at
        most `limit` (what a worker reports to the router: the longest of a request's prefix hashes among them
        is where this worker would restore it; 8 bytes each in every Stats)."""
        host = [key for (kind, key) in reversed(list(self.host_lru)) if kind == SNAPSHOT]
        return [*reversed(list(self.lru)), *host][:limit]

    @property
    def num_snapshots(self) -> int:
        return len(self.lru)

    @property
    def num_host_snapshots(self) -> int:
        return sum(1 for kind, _ in list(self.host_lru) if kind == SNAPSHOT)

    @property
    def num_host_pages(self) -> int:
        return sum(1 for kind, _ in list(self.host_lru) if kind == PAGE)

    @property
    def host_used(self) -> int:
        """Host bytes the host tier takes (its snapshots and pages)."""
        return self.host.cached if self.host is not None else 0

    def num_bytes(self) -> int:
        """Device bytes the cache holds: its snapshots and the pages only it holds."""
        return self.num_snapshots * self.snapshot_bytes + self.reclaimable_pages() * self.page_bytes


def page_parts(pools: KVPools) -> dict[str, torch.Tensor]:
    """name → the pool tensor indexed by page of every piece a page holds (compressed rows, indexer rows)."""
    out = {}
    for i, ratio in enumerate(pools.geometry.ratios):
        if ratio:
            out[f"layers.{i}.kv_compressed"] = pools.compressed_view(i)
        if ratio == 4:
            out[f"layers.{i}.index_cache"] = pools.index_cache[i]
    return out


def copy_slot(pools: KVPools, source: int, target: int) -> None:
    """Copy one slot's state (SWA ring, compressor and indexer rings, and what `extra_slot_state` keeps per slot:
    the MTP layer's ring) into another, on the device."""
    for layer, ratio in enumerate(pools.geometry.ratios):
        pools.swa_view(layer)[target] = pools.swa_view(layer)[source]
        for rings in (pools.rings[layer], pools.index_rings[layer]) if ratio else ():
            if rings is not None:
                rings[0][target], rings[1][target] = rings[0][source], rings[1][source]
    for ring in pools.extra_slot_state.values():
        ring[target] = ring[source]
