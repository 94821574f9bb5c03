"""The speculative step's undo log (engine/undo.py) at a fixed shape per batch bucket, as two CUDA graphs.

`UndoLog` saves a verification's rows with one `index_select` per pool tensor and writes the rejected ones back
with one `index_copy_` each: ~12 launches before the forward and ~13 after it at the `bench` geometry, every one
on the step's critical path (the speculative step is synchronous). Here the same work has a fixed shape per
bucket of spans (the verification graphs' buckets) and k positions a span, so it is captured once and replayed:

- save: the rows' flat indices go to the device in one copy (a static buffer), and one replay gathers every pool
  tensor's rows into its static saved buffer;
- restore: which rows were rejected goes in one more copy, and one replay writes, for every row,
  `where(rejected, saved, current)` back: a kept row gets its current value again, a rejected one its old value.

Padding: a kind's index past its real rows repeats its first row with that row's flag (so every write to that row
carries the same value and the order of duplicate writes does not matter); a kind with no real row in a step (no
position completes a block) points at its row 0 with the flag off, which writes row 0's current value back. The
result is `UndoLog`'s (tests/engine/test_undo_graphs.py compares the pools after both). With `capture=False` the
same static bodies run eagerly, on any device.

Memory: the saved rows and a scratch of as many, per pool tensor, at the largest bucket, shared by every bucket
(one step runs at a time) and allocated at the first speculative step; the bodies allocate nothing. Only buckets
up to `MAX_SPANS` spans are served; a step with more spans uses `UndoLog`.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from sparsepd.engine.graphs import StaticFields, warmed_capture
from sparsepd.engine.pools import KVPools
from sparsepd.engine.undo import RowKind, Span, span_rows

log = logging.getLogger(__name__)

# Steps of more spans use `UndoLog`: its launches matter less beside a larger verification, and the buffers here
# (two per pool tensor, k rows a span: ~130 MB at 64 spans, k = 3 and V4-Flash's 43 layers) stay allocated.
MAX_SPANS = 64


def kind_capacity(kind: RowKind, spans: int, span_len: int) -> int:
    """The most rows of `kind` that `spans` spans of ≤ span_len positions hold (one copy): a ring row per position;
    a committed row per position that completes a block, ≤ ceil(span_len / ratio) in span_len consecutive ones."""
    return spans * (span_len if kind.name != "commit" else -(-span_len // kind.ratio))


class _UndoStep:
    """One bucket's static buffers and graphs."""

    def __init__(self, owner: UndoGraphs, bucket: int):
        self.bucket = bucket
        self.kinds = owner.kinds
        self.caps = [kind_capacity(k, bucket, owner.span_len) for k in self.kinds]
        device = owner.pools.device
        self.index = StaticFields({f"k{i}": torch.zeros(cap * k.copies, dtype=torch.int64)
                                   for i, (k, cap) in enumerate(zip(self.kinds, self.caps, strict=True))}, device)
        self.flags = StaticFields({f"k{i}": torch.zeros(cap * k.copies, dtype=torch.bool)
                                   for i, (k, cap) in enumerate(zip(self.kinds, self.caps, strict=True))}, device)
        position = {k: i for i, k in enumerate(self.kinds)}
        # (flat target, its index, its flags shaped to broadcast over a row, its saved rows, a scratch of as many):
        # the rows are views of the buffers every bucket shares (`UndoGraphs.scratch`), one step runs at a time
        self.work = []
        for (target, kind), (saved, current) in zip(owner.targets, owner.scratch(), strict=True):
            i = position[kind]
            index = self.index.fields[f"k{i}"]
            flags = self.flags.fields[f"k{i}"].view(-1, *([1] * (target.dim() - 1)))
            rows = index.shape[0]
            self.work.append((target, index, flags, saved[:rows], current[:rows]))
        self.save_graph: torch.cuda.CUDAGraph | None = None
        self.restore_graph: torch.cuda.CUDAGraph | None = None

    def save_body(self) -> None:
        for target, index, _, saved, _ in self.work:
            torch.index_select(target, 0, index, out=saved)

    def restore_body(self) -> None:  # (no allocation: a graph of it holds no memory of its own)
        for target, index, flags, saved, current in self.work:
            torch.index_select(target, 0, index, out=current)
            torch.where(flags, saved, current, out=current)
            target.index_copy_(0, index, current)


class StaticUndoLog:
    """`UndoLog`'s contract (`restore(kept)`) over one bucket's static step; the save ran when it was made."""

    def __init__(self, owner: UndoGraphs, step: _UndoStep, ids: np.ndarray, pos: np.ndarray,
                 rows: list[np.ndarray | None]):
        self.owner, self.step, self._ids, self._pos, self._rows = owner, step, ids, pos, rows

    def restore(self, kept: list[int]) -> int:
        """Write back the rows of every position ≥ kept[i] of span i; the rows written back (every copy)."""
        rejected = self._pos >= np.asarray(kept, dtype=np.int64)[self._ids]
        if not rejected.any():
            return 0
        step, restored = self.step, 0
        flags = [rejected if rows is None else rejected[rows] for rows in self._rows]
        for kind, mine in zip(step.kinds, flags, strict=True):
            restored += np.count_nonzero(mine) * kind.copies * self.owner.tensors_of[kind]

        def write(views: dict[str, np.ndarray]) -> None:
            for i, (mine, cap, kind) in enumerate(zip(flags, step.caps, step.kinds, strict=True)):
                view, n = views[f"k{i}"].reshape(kind.copies, cap), mine.shape[0]  # a row per copy
                view[:, :n] = mine
                view[:, n:] = mine[0] if n else False

        step.flags.fill(write)
        self.owner._run(step, "restore")
        return restored


class UndoGraphs:
    """The undo log of a speculative step with at most `span_len` positions a span, per bucket of spans: captured
    as CUDA graphs on first use, or with capture=False run eagerly from the same static buffers (module doc)."""

    def __init__(self, pools: KVPools, targets: list[tuple[torch.Tensor, RowKind]], span_len: int,
                 buckets: tuple[int, ...], capture: bool, max_spans: int = MAX_SPANS):
        if capture and pools.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, the pools are on {pools.device}")
        self.pools, self.targets, self.span_len, self.capture = pools, targets, span_len, capture
        self.buckets = tuple(b for b in buckets if b <= max_spans) or buckets[:1]
        self._scratch: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.kinds: list[RowKind] = list(dict.fromkeys(kind for _, kind in targets))
        self.tensors_of = {k: sum(1 for _, kind in targets if kind == k) for k in self.kinds}
        self._copy_offsets = {k: np.arange(k.copies, dtype=np.int64)[:, None] * k.stride for k in self.kinds}
        self._steps: dict[int, _UndoStep] = {}
        self._pool = torch.cuda.graph_pool_handle() if capture else None
        self.runs = 0  # saves run (replays, or eager runs without capture)

    def scratch(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per target, the saved rows and a scratch of as many at the largest bucket (made on first use): every
        bucket's step uses their first rows."""
        if self._scratch is None:
            self._scratch = [(target.new_zeros(rows, *target.shape[1:]), target.new_zeros(rows, *target.shape[1:]))
                             for (target, _), rows in zip(self.targets, self._scratch_rows(), strict=True)]
        return self._scratch

    def _scratch_rows(self) -> list[int]:
        """Per target, the rows its saved and scratch buffers hold: the largest bucket's (one copy each)."""
        return [kind_capacity(kind, self.buckets[-1], self.span_len) * kind.copies for _, kind in self.targets]

    def planned_bytes(self) -> int:
        """Device bytes the shared buffers take once made (`scratch`)."""
        return sum(2 * rows * target[0].numel() * target.element_size()
                   for (target, _), rows in zip(self.targets, self._scratch_rows(), strict=True))

    @property
    def scratch_bytes(self) -> int:
        """Device bytes of the shared buffers (0 before the first step)."""
        return sum(a.numel() * a.element_size() * 2 for a, _ in self._scratch or [])

    def log(self, spans: list[Span]) -> StaticUndoLog | None:
        """Save the spans' rows (one copy, one replay); None when they do not fit a bucket (`UndoLog` then)."""
        if not spans or len(spans) > self.buckets[-1] or any(s.last - s.first > self.span_len for s in spans):
            return None
        step = self._step(next(b for b in self.buckets if b >= len(spans)))
        ids, pos, found = span_rows(spans, self.targets)
        rows = [found[kind][0] for kind in step.kinds]

        def write(views: dict[str, np.ndarray]) -> None:
            for i, (kind, cap) in enumerate(zip(step.kinds, step.caps, strict=True)):
                index, copies = found[kind][1], self._copy_offsets[kind]
                view, n = views[f"k{i}"].reshape(kind.copies, cap), index.shape[0]  # a row per copy
                view[:, :n] = index + copies
                view[:, n:] = (index[0] if n else 0) + copies  # padding: the first row again, or row 0

        step.index.fill(write)
        self._run(step, "save")
        self.runs += 1
        return StaticUndoLog(self, step, ids, pos, rows)

    def _run(self, step: _UndoStep, which: str) -> None:
        graph = step.save_graph if which == "save" else step.restore_graph
        if graph is not None:
            graph.replay()
        elif which == "save":
            step.save_body()
        else:
            step.restore_body()

    def _step(self, bucket: int) -> _UndoStep:
        found = self._steps.get(bucket)
        if found is not None:
            return found
        t0 = time.perf_counter()
        step = _UndoStep(self, bucket)  # indices 0, flags off: the bodies read row 0 and write it back unchanged
        if self.capture:
            step.save_graph, _ = warmed_capture(step.save_body, self._pool, warmups=1)
            step.restore_graph, _ = warmed_capture(step.restore_body, self._pool, warmups=1)
            log.info("captured the undo graphs of %d spans in %.3f s (%.1f MiB of buffers for every bucket)", bucket,
                     time.perf_counter() - t0, self.scratch_bytes / 2**20)
        self._steps[bucket] = step
        return step


__all__ = ["StaticUndoLog", "UndoGraphs", "kind_capacity"]
