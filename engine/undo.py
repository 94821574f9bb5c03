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

from dataclasses import dataclass

import torch

from sparsepd.engine.pools import KVPools


@dataclass(frozen=True)
class Span:
    """Positions first … last−1 of the request in `slot` with `pages` that a forward may have to take back."""

    slot: int
    pages: tuple[int, ...]
    first: int
    last: int


def max_span(pools: KVPools) -> int:
    """The most positions one span may hold: the smallest ring (window, compressor state sizes)."""
    sizes = [pools.geometry.window] + [(2 if r == 4 else 1) * r for r in pools.geometry.ratios if r]
    return min(sizes)


@dataclass
class _Saved:
    target: torch.Tensor  # the pool tensor (or view) the rows live in
    index: tuple[torch.Tensor, ...]  # advanced index of the rows, one tensor per leading dim
    values: torch.Tensor  # the rows as they were
    span_ids: list[int]  # the span of each row
    positions: list[int]  # the position of each row


class UndoLog:
    """Rows saved before a forward; `restore` writes back those of the positions a span did not keep."""

    def __init__(self, pools: KVPools, spans: list[Span]):
        self.pools, self.spans = pools, spans
        self._saved: list[_Saved] = []
        self._indices: dict[tuple, tuple[torch.Tensor, ...]] = {}
        limit = max_span(pools)
        for s in spans:
            if s.last - s.first > limit:
                raise ValueError(f"a span of {s.last - s.first} positions exceeds the smallest ring ({limit})")
        if spans:
            self._save()

    def _save(self) -> None:
        pools, g = self.pools, self.pools.geometry
        rows = [(i, s.slot, p) for i, s in enumerate(self.spans) for p in range(s.first, s.last)]
        ids, slots, pos = [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]
        index = self._index  # one index tensor per kind of row, shared by the layers of that kind
        swa = index(("swa",), [slots, [p % g.window for p in pos]])
        for layer, ratio in enumerate(g.ratios):
            self._add(pools.swa_view(layer), swa, ids, pos)
            if not ratio:
                continue
            size = (2 if ratio == 4 else 1) * ratio
            ring = index(("ring", size), [slots, [p % size for p in pos]])
            for rings in (pools.rings[layer], pools.index_rings[layer]):
                if rings is not None:
                    self._add(rings[0], ring, ids, pos)
                    self._add(rings[1], ring, ids, pos)
            rpp = g.rows_per_page(ratio)
            commits = [(i, p, self.spans[i].pages[(p // ratio) // rpp], (p // ratio) % rpp)
                       for i, p in zip(ids, pos, strict=True) if (p + 1) % ratio == 0]
            if commits:
                c_ids, c_pos = [c[0] for c in commits], [c[1] for c in commits]
                rows_index = index(("commit", ratio), [[c[2] for c in commits], [c[3] for c in commits]])
                self._add(pools.compressed_view(layer), rows_index, c_ids, c_pos)
                if pools.index_cache[layer] is not None:
                    self._add(pools.index_cache[layer], rows_index, c_ids, c_pos)

    def _index(self, key: tuple, index: list[list[int]]) -> tuple[torch.Tensor, ...]:
        if key not in self._indices:
            both = torch.tensor(index, dtype=torch.int64).reshape(len(index), -1)  # [dims, n]
            if self.pools.device.type == "cuda":
                both = both.pin_memory().to(self.pools.device, non_blocking=True)
            self._indices[key] = tuple(both)
        return self._indices[key]

    def _add(self, target: torch.Tensor, idx: tuple[torch.Tensor, ...], ids: list[int], positions: list[int]) -> None:
        self._saved.append(_Saved(target, idx, target[idx], ids, positions))  # (advanced indexing copies)

    def restore(self, kept: list[int]) -> int:
        """Write back the rows of every position ≥ kept[i] of span i (the positions it rejected); the rows
        written back."""
        restored = 0
        for saved in self._saved:
            rejected = [j for j, (i, p) in enumerate(zip(saved.span_ids, saved.positions, strict=True))
                        if p >= kept[i]]
            if not rejected:
                continue
            if len(rejected) == len(saved.positions):
                saved.target[saved.index] = saved.values
            else:
                sel = torch.tensor(rejected, dtype=torch.int64, device=saved.values.device)
                saved.target[tuple(t[sel] for t in saved.index)] = saved.values[sel]
            restored += len(rejected)
        return restored
