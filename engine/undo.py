"""Undo information for positions a forward writes that may be rejected afterwards (speculative decoding).

A verification forward (engine/speculative.py) computes a request's last token and its k drafted ones at
positions s … s+k; only a prefix of them is accepted. Every place the forward writes per position is a row
indexed by that position, so the rows of the positions that may be rejected (s+1 … s+k) are saved before the
forward and the rejected ones are written back after it:

- each layer's SWA ring row (slot, p % window);
- each compressed layer's compressor rings kv/score (slot, p % state_size), and the indexer's rings of CSA layers;
- where p completes a block ((p+1) % ratio == 0), the committed compressed row of entry p // ratio (and the
  indexer row of CSA layers) in the request's page.

Undo rather than scratch-and-commit: the forward writes in place as usual (the same kernels and write plans as
any forward), and the saved rows are k per request and layer. Writing the verification's state to scratch and
committing the accepted part would need a second write path through every kernel that updates state. Rows of
distinct positions in one span are distinct as long as k + 1 ≤ the smallest ring (the window and every
compressor's state size; `check_span` enforces it), so restoring a rejected position's row restores exactly the
value the accepted positions left there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from sparsepd.engine.pools import KVPools
from sparsepd.engine.runner import to_device


@dataclass(frozen=True)
class Span:
    """Positions first … last−1 of the request in `slot` with `pages` that a forward may have to take back."""

    slot: int
    pages: Sequence[int]  # (read while the log saves: a request's own list will do)
    first: int
    last: int


def max_span(pools: KVPools) -> int:
    """The most positions one span may hold: the smallest ring (window, compressor state sizes)."""
    sizes = [pools.geometry.window] + [(2 if r == 4 else 1) * r for r in pools.geometry.ratios if r]
    return min(sizes)


class RowKind(NamedTuple):  # (a tuple: hashed without a Python call, a dict key at every step)
    """How a pool tensor's rows are indexed: row (i0, i1) of a `[n0, n1, …]` tensor is row i0 · n1 + i1 of its flat
    view; `copies` > 1: the flat view holds that many such tensors `stride` rows apart (a compressor's kv and score
    rings, one allocation: engine/pools.py), moved in one operation."""

    name: str  # "swa": (slot, p % window); "ring": (slot, p % state size); "commit": (page, entry p // ratio in it)
    n1: int
    ratio: int = 0  # "commit": the compress ratio
    copies: int = 1
    stride: int = 0


def undo_targets(pools: KVPools) -> list[tuple[torch.Tensor, RowKind]]:
    """Every pool tensor a forward writes per position (module doc) as a flat view of its rows, with its `RowKind`.
    Built once per pools: the views are the same at every step."""
    g, out = pools.geometry, []

    def add(t: torch.Tensor, kind: RowKind) -> None:
        assert t.shape[1] == kind.n1, (t.shape, kind)
        out.append((t.view(-1, *t.shape[2:]), kind))  # (a view: the restore writes through it)

    for layer, ratio in enumerate(g.ratios):
        add(pools.swa_view(layer), RowKind("swa", g.window))
        if not ratio:
            continue
        size = (2 if ratio == 4 else 1) * ratio
        for rings in (pools.rings[layer], pools.index_rings[layer]):
            if rings is None:
                continue
            both = rings[0]._base  # (the views' one allocation `[2, slots, size, …]`, where the pools made one)
            if both is not None and both.shape[0] == 2 and both[0].data_ptr() == rings[0].data_ptr() and \
                    both[1].data_ptr() == rings[1].data_ptr() and both.is_contiguous():
                stride = both.shape[1] * both.shape[2]
                assert both.shape[2] == size, (both.shape, size)
                out.append((both.view(-1, *both.shape[3:]), RowKind("ring", size, copies=2, stride=stride)))
            else:
                add(rings[0], RowKind("ring", size))
                add(rings[1], RowKind("ring", size))
        commit = RowKind("commit", g.rows_per_page(ratio), ratio)
        add(pools.compressed_view(layer), commit)
        if pools.index_cache[layer] is not None:
            add(pools.index_cache[layer], commit)
    return out


def span_rows(spans: list[Span], targets: list[tuple[torch.Tensor, RowKind]]
              ) -> tuple[np.ndarray, np.ndarray, dict[RowKind, tuple[np.ndarray | None, np.ndarray]]]:
    """The spans' positions as rows: (the span of each position, the position, and per kind of the targets (rows:
    which positions have a row of that kind, None: all; the flat index of each such row in one copy))."""
    lengths = np.array([s.last - s.first for s in spans], dtype=np.int64)
    ids = np.repeat(np.arange(len(spans)), lengths)  # the span of each row
    offsets = np.cumsum(lengths) - lengths
    firsts = np.array([s.first for s in spans], dtype=np.int64)
    pos = firsts[ids] + np.arange(ids.shape[0]) - offsets[ids]  # the position of each row
    slots = np.array([s.slot for s in spans], dtype=np.int64)[ids]
    found: dict[RowKind, tuple[np.ndarray | None, np.ndarray]] = {}
    for _, kind in targets:
        if kind in found:
            continue
        if kind.name != "commit":  # ring row (slot, p % size)
            found[kind] = (None, slots * kind.n1 + pos % kind.n1)
            continue
        rows = ((pos + 1) % kind.ratio == 0).nonzero()[0]  # the committed row of entry p // ratio in its page
        rpp, entries = kind.n1, pos[rows] // kind.ratio
        pages = [spans[i].pages[e] for i, e in zip(ids[rows].tolist(), (entries // rpp).tolist(), strict=True)]
        found[kind] = (rows, np.array(pages, dtype=np.int64) * rpp + entries % rpp)
    return ids, pos, found


@dataclass
class _Kind:
    """The rows of one kind of index: which of the log's rows (None: all of them), their flat index (each copy's
    in turn) and how many there are of one copy."""

    rows: np.ndarray | None
    index: np.ndarray  # [copies · n] int64
    n: int


class UndoLog:
    """Rows saved before a forward; `restore` writes back those of the positions a span did not keep.

    A row is saved with one `index_select` and written back with one `index_copy_` per pool tensor, over flat
    views (cheaper to launch than advanced indexing), their indices sent to the device in one copy, and a
    restore's selection in one more (none when every span keeps all or none of its positions): a speculative
    step's host work is on its critical path."""

    def __init__(self, pools: KVPools, spans: list[Span], targets: list[tuple[torch.Tensor, RowKind]] | None = None):
        """targets: `undo_targets(pools)`, when the caller keeps them."""
        self.pools, self.spans = pools, spans
        self._saved: list[tuple[torch.Tensor, RowKind, torch.Tensor]] = []  # (flat view, kind, the rows as they were)
        self._kinds: dict[RowKind, _Kind] = {}
        self._index: dict[RowKind, torch.Tensor] = {}
        limit = max_span(pools)
        for s in spans:
            if s.last - s.first > limit:
                raise ValueError(f"a span of {s.last - s.first} positions exceeds the smallest ring ({limit})")
        if spans:
            self._save(undo_targets(pools) if targets is None else targets)

    def _save(self, targets: list[tuple[torch.Tensor, RowKind]]) -> None:
        self._ids, self._pos, found = span_rows(self.spans, targets)
        kinds = self._kinds
        for kind, (rows, index) in found.items():
            if not index.shape[0]:
                continue
            n = index.shape[0]
            if kind.copies > 1:
                index = np.concatenate([index + c * kind.stride for c in range(kind.copies)])
            kinds[kind] = _Kind(rows, index, n)
        keys = list(kinds)
        self._index = index = dict(zip(keys, self._to_device([kinds[key].index for key in keys]), strict=True))
        for target, kind in targets:
            if kind in index:
                self._saved.append((target, kind, target.index_select(0, index[kind])))

    def _to_device(self, arrays: list[np.ndarray]) -> tuple[torch.Tensor, ...]:
        """Host int64 arrays on the device, all through one copy."""
        if not arrays:
            return ()
        flat = to_device(np.concatenate(arrays), self.pools.device)
        return flat.split([a.shape[0] for a in arrays])

    def restore(self, kept: list[int]) -> int:
        """Write back the rows of every position ≥ kept[i] of span i (the positions it rejected); the rows
        written back."""
        if not self._saved:
            return 0
        rejected = self._pos >= np.asarray(kept, dtype=np.int64)[self._ids]
        if not rejected.any():
            return 0
        if rejected.all():
            for target, kind, values in self._saved:
                target.index_copy_(0, self._index[kind], values)
            return sum(values.shape[0] for _, _, values in self._saved)
        keys, arrays = [], []  # per kind: the selected rows of its saved values, and their flat index
        for key, kind in self._kinds.items():
            mine = rejected if kind.rows is None else rejected[kind.rows]
            sel = mine.nonzero()[0]
            if sel.shape[0]:
                if key.copies > 1:
                    sel = np.concatenate([sel + c * kind.n for c in range(key.copies)])
                keys.append(key)
                arrays += [sel, kind.index[sel]]
        parts = self._to_device(arrays)
        chosen = {key: (parts[2 * i], parts[2 * i + 1]) for i, key in enumerate(keys)}
        restored = 0
        for target, kind, values in self._saved:
            if kind in chosen:
                sel, index = chosen[kind]
                target.index_copy_(0, index, values.index_select(0, sel))
                restored += sel.shape[0]
        return restored
