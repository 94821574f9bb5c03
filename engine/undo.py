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

import numpy as np
import torch

from sparsepd.engine.pools import KVPools


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


def undo_targets(pools: KVPools) -> list[tuple[torch.Tensor, tuple]]:
    """Every pool tensor a forward writes per position (module doc) as a flat view of its rows `[n0 × n1, …]`, with
    the kind of row index it takes: ("swa", window), ("ring", state size) or ("commit", rows per page), the kind's
    second number being n1 (a row (i0, i1) is row i0 · n1 + i1 of the view). Built once per pools: the views are
    the same at every step."""
    g, out = pools.geometry, []

    def add(t: torch.Tensor, kind: tuple) -> None:
        assert t.shape[1] == kind[1], (t.shape, kind)
        out.append((t.view(-1, *t.shape[2:]), kind))  # (a view: the restore writes through it)

    for layer, ratio in enumerate(g.ratios):
        add(pools.swa_view(layer), ("swa", g.window))
        if not ratio:
            continue
        ring = ("ring", (2 if ratio == 4 else 1) * ratio)
        for rings in (pools.rings[layer], pools.index_rings[layer]):
            if rings is not None:
                add(rings[0], ring)
                add(rings[1], ring)
        commit = ("commit", g.rows_per_page(ratio), ratio)
        add(pools.compressed_view(layer), commit)
        if pools.index_cache[layer] is not None:
            add(pools.index_cache[layer], commit)
    return out


@dataclass
class _Kind:
    """The rows of one kind of index: which of the log's rows (None: all of them) and their flat index."""

    rows: np.ndarray | None
    index: np.ndarray  # [n] int64


class UndoLog:
    """Rows saved before a forward; `restore` writes back those of the positions a span did not keep.

    A row is saved with one `index_select` and written back with one `index_copy_` per pool tensor, over flat
    views (cheaper to launch than advanced indexing), their indices sent to the device in one copy, and a
    restore's selection in one more (none when every span keeps all or none of its positions): a speculative
    step's host work is on its critical path."""

    def __init__(self, pools: KVPools, spans: list[Span], targets: list[tuple[torch.Tensor, tuple]] | None = None):
        """targets: `undo_targets(pools)`, when the caller keeps them."""
        self.pools, self.spans = pools, spans
        self._saved: list[tuple[torch.Tensor, tuple, torch.Tensor]] = []  # (flat target view, kind, rows as they were)
        self._kinds: dict[tuple, _Kind] = {}
        self._index: dict[tuple, torch.Tensor] = {}
        limit = max_span(pools)
        for s in spans:
            if s.last - s.first > limit:
                raise ValueError(f"a span of {s.last - s.first} positions exceeds the smallest ring ({limit})")
        if spans:
            self._save(undo_targets(pools) if targets is None else targets)

    def _save(self, targets: list[tuple[torch.Tensor, tuple]]) -> None:
        spans = self.spans
        lengths = np.array([s.last - s.first for s in spans], dtype=np.int64)
        ids = np.repeat(np.arange(len(spans)), lengths)  # the span of each row
        offsets = np.cumsum(lengths) - lengths
        firsts = np.array([s.first for s in spans], dtype=np.int64)
        pos = firsts[ids] + np.arange(ids.shape[0]) - offsets[ids]  # the position of each row
        slots = np.array([s.slot for s in spans], dtype=np.int64)[ids]
        self._ids, self._pos = ids, pos
        kinds = self._kinds
        for _, kind in targets:
            if kind in kinds:
                continue
            if kind[0] != "commit":  # ring row (slot, p % size)
                kinds[kind] = _Kind(None, slots * kind[1] + pos % kind[1])
                continue
            rpp, ratio = kind[1], kind[2]  # the committed row of entry p // ratio in its page
            rows = ((pos + 1) % ratio == 0).nonzero()[0]
            if rows.shape[0]:
                entries = pos[rows] // ratio
                pages = [spans[i].pages[e] for i, e in zip(ids[rows].tolist(), (entries // rpp).tolist(), strict=True)]
                kinds[kind] = _Kind(rows, np.array(pages, dtype=np.int64) * rpp + entries % rpp)
        keys = list(kinds)
        self._index = index = dict(zip(keys, self._to_device([kinds[key].index for key in keys]), strict=True))
        for target, kind in targets:
            if kind in index:
                self._saved.append((target, kind, target.index_select(0, index[kind])))

    def _to_device(self, arrays: list[np.ndarray]) -> tuple[torch.Tensor, ...]:
        """Host int64 arrays on the device, all through one copy."""
        if not arrays:
            return ()
        flat = torch.from_numpy(np.concatenate(arrays))
        if self.pools.device.type == "cuda":
            flat = flat.pin_memory().to(self.pools.device, non_blocking=True)
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
