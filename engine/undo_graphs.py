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
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from sparsepd.engine.graphs import StaticFields, capturing
from sparsepd.engine.pools import KVPools
from sparsepd.engine.undo import RowKind, Span, span_rows

log = logging.getLogger(__name__)


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
        self.work = []  # (flat target, its index, its flags shaped to broadcast over a row, saved rows)
        for target, kind in owner.targets:
            i = position[kind]
            index = self.index.fields[f"k{i}"]
            flags = self.flags.fields[f"k{i}"].view(-1, *([1] * (target.dim() - 1)))
            saved = target.new_zeros(index.shape[0], *target.shape[1:])
            self.work.append((target, index, flags, saved))
        self.save_graph: torch.cuda.CUDAGraph | None = None
        self.restore_graph: torch.cuda.CUDAGraph | None = None

    def save_body(self) -> None:
        for target, index, _, saved in self.work:
            torch.index_select(target, 0, index, out=saved)

    def restore_body(self) -> None:
        for target, index, flags, saved in self.work:
            target.index_copy_(0, index, torch.where(flags, saved, target.index_select(0, index)))


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
                 buckets: tuple[int, ...], capture: bool):
        if capture and pools.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, the pools are on {pools.device}")
        self.pools, self.targets, self.span_len, self.buckets, self.capture = pools, targets, span_len, buckets, capture
        self.kinds: list[RowKind] = list(dict.fromkeys(kind for _, kind in targets))
        self.tensors_of = {k: sum(1 for _, kind in targets if kind == k) for k in self.kinds}
        self._copy_offsets = {k: np.arange(k.copies, dtype=np.int64)[:, None] * k.stride for k in self.kinds}
        self._steps: dict[int, _UndoStep] = {}
        self._pool = torch.cuda.graph_pool_handle() if capture else None
        self.runs = 0  # saves run (replays, or eager runs without capture)

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
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm up
                step.save_body()
                step.restore_body()
            torch.cuda.current_stream().wait_stream(side)
            step.save_graph, step.restore_graph = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
            with capturing(step.save_graph, self._pool):
                step.save_body()
            with capturing(step.restore_graph, self._pool):
                step.restore_body()
            torch.cuda.synchronize()
            log.info("captured the undo graphs of %d spans in %.3f s", bucket, time.perf_counter() - t0)
        self._steps[bucket] = step
        return step


__all__ = ["StaticUndoLog", "UndoGraphs", "kind_capacity"]
