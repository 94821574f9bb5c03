"""Drawing a step's tokens on the device and reading them on the host once.

`draw` samples every row of a step's logits in one batch on the logits' device (kernels/sampling.py;
a plain argmax (kernels/argmax.py) when every row is greedy with nothing banned, no penalty, bias or grammar and no
log-probabilities wanted; penalties read each row's token history from its slot, engine/penalties.py;
grammar rows are masked by the step's token bitmask, engine/grammar.py); should the batch raise, it draws
row by row so that a row that fails fails its own request only (`Drawn.failed`), and
`Drawn.to_host` starts one asynchronous copy of the tokens (and, when asked for, one of the
log-probabilities: the drawn token's, the top ones, those of the rows' token_ids_logprob) into pinned host
memory. `HostDraw.result()` waits for that copy: the one host sync of
a step, which with the scheduler's overlap happens after the next step is already queued.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from sparsepd.engine.penalties import penalty_tensors
from sparsepd.engine.sampling import Sampler, SamplingParams, TokenLogprobs, sampling_tensors
from sparsepd.gpu_wait import GpuWait
from sparsepd.kernels.argmax import argmax_rows
from sparsepd.kernels.sampling import SampleOutput, sample_batch

log = logging.getLogger("sparsepd.engine")


@dataclass
class HostDraw:
    tokens: torch.Tensor  # [B] int64, pinned on CUDA
    floats: torch.Tensor | None  # [B, 1 + N + K] logprob, top logprobs, token_ids_logprob values
    top_ids: torch.Tensor | None  # [B, N]
    event: torch.cuda.Event | None

    def result(self) -> tuple[list[int], list[TokenLogprobs] | None]:
        if self.event is not None:
            self.event.synchronize()
        tokens = self.tokens.tolist()
        if self.floats is None:
            return tokens, None
        floats, ids = self.floats.tolist(), self.top_ids.tolist()
        return tokens, [TokenLogprobs(f[0], tuple(i), tuple(f[1:1 + len(i)]), tuple(f[1 + len(i):]))
                        for f, i in zip(floats, ids, strict=True)]


@dataclass
class Drawn:
    tokens: torch.Tensor  # [B] int64 on the device
    logprobs: torch.Tensor | None  # [B] fp32
    top_ids: torch.Tensor | None  # [B, N] int64
    top_logprobs: torch.Tensor | None  # [B, N] fp32
    wants_logprobs: list[bool]
    top_n: list[int]
    ids_logprobs: torch.Tensor | None = None  # [B, K] fp32 (K = the most token_ids_logprob a row has)
    num_ids: list[int] | None = None  # each row's len(token_ids_logprob)
    failed: dict[int, str] = field(default_factory=dict)  # row → why it could not be drawn (its token is 0)

    def to_host(self, gpu_wait: GpuWait = "spin") -> HostDraw:
        cuda = self.tokens.is_cuda
        tokens = torch.empty(self.tokens.shape, dtype=torch.int64, pin_memory=cuda)
        tokens.copy_(self.tokens, non_blocking=True)
        floats = ids = None
        if any(self.wants_logprobs):
            parts = [self.logprobs[:, None], self.top_logprobs]
            f = torch.cat(parts if self.ids_logprobs is None else [*parts, self.ids_logprobs], dim=1)
            floats = torch.empty(f.shape, dtype=f.dtype, pin_memory=cuda)
            floats.copy_(f, non_blocking=True)
            ids = torch.empty(self.top_ids.shape, dtype=torch.int64, pin_memory=cuda)
            ids.copy_(self.top_ids, non_blocking=True)
        event = None
        if cuda:
            event = host_event(gpu_wait)
            event.record()
        host = HostDraw(tokens, floats, ids, event)
        if floats is not None:
            host = _PerRowLogprobs(host, self.wants_logprobs, self.top_n, self.num_ids or [0] * len(self.top_n))
        return host


def host_event(gpu_wait: GpuWait) -> torch.cuda.Event:
    """The event the host waits on for a step's copy. "spin": CUDA's default flags, whose synchronize() polls (the
    waiting thread keeps about one core busy: bench/RESULTS.md, the decode worker's host cost); "block": the
    blocking-sync flag, the thread sleeps until the event completes (less CPU, a wake-up latency)."""
    return torch.cuda.Event(blocking=gpu_wait == "block")


class _PerRowLogprobs(HostDraw):
    """Log-probabilities only for the rows that asked, each with its own top-N."""

    def __init__(self, inner: HostDraw, wants: list[bool], top_n: list[int], num_ids: list[int]):
        super().__init__(inner.tokens, inner.floats, inner.top_ids, inner.event)
        self.wants, self.top_n, self.num_ids = wants, top_n, num_ids

    def result(self) -> tuple[list[int], list[TokenLogprobs | None]]:
        tokens, lps = super().result()
        return tokens, [TokenLogprobs(lp.logprob, lp.top_ids[:n], lp.top_logprobs[:n], lp.ids_logprobs[:k])
                        if want else None
                        for lp, want, n, k in zip(lps, self.wants, self.top_n, self.num_ids, strict=True)]


@dataclass
class InFlightStep:
    """A launched step: what it ran, which requests sample in it (in row order), their tokens on the way."""

    scheduled: list
    sampled: list
    host: HostDraw | None
    prompt: tuple | None = None  # (PromptRows, HostScores): prompt log-probabilities scored in this step


def draw(logits: torch.Tensor, rows: list[tuple[SamplingParams, Sampler, int, int]],
         device: torch.device, token_bitmask: torch.Tensor | None = None) -> Drawn:
    """Sample one token per row of logits `[B, V]` fp32; rows: (params, sampler, tokens drawn, eos id);
    token_bitmask `[B, ⌈V/32⌉]` int32 on the device when a row has a grammar (engine/grammar.py)."""
    wants = [p.wants_logprobs for p, *_ in rows]
    top_n = [p.top_logprobs for p, *_ in rows]
    plain = token_bitmask is None and not any(wants) and all(
        p.greedy and not p.banned(n, eos) and not p.penalized for p, _, n, eos in rows)
    if plain:  # the common greedy case: one argmax kernel
        return plain_draw(logits)
    num_ids = [len(p.token_ids_logprob) for p, *_ in rows]
    try:
        out = _sample(logits, rows, device, max(top_n), token_bitmask)
    except Exception:  # noqa: BLE001 - find the rows that fail; the others must not fail with them
        return _draw_row_by_row(logits, rows, device, token_bitmask, wants, top_n, num_ids)
    return Drawn(out.tokens, out.logprobs, out.top_ids, out.top_logprobs, wants, top_n, out.ids_logprobs, num_ids)


def plain_draw(logits: torch.Tensor) -> Drawn:
    """`draw` of rows that are all greedy with nothing banned, no penalty, bias, grammar or log-probabilities:
    each row's argmax (on a GPU kernels/argmax.py, split across the row; torch.argmax's index, which the CPU calls
    directly: no checks on the host's path; the scheduler knows this from each request's `plain_from` without
    building the rows)."""
    rows = logits.shape[0]
    tokens = argmax_rows(logits) if logits.is_cuda else logits.argmax(-1)
    return Drawn(tokens, None, None, None, [False] * rows, [0] * rows)


def _sample(logits: torch.Tensor, rows: list, device: torch.device, top_n: int,
            token_bitmask: torch.Tensor | None) -> SampleOutput:
    params = sampling_tensors(rows, device)
    params.token_bitmask = token_bitmask
    params.want_top_logprobs = top_n
    if any(p.penalized for p, *_ in rows):
        params.penalties = penalty_tensors(rows, device)
    return sample_batch(logits, params)


def _draw_row_by_row(logits: torch.Tensor, rows: list, device: torch.device, token_bitmask: torch.Tensor | None,
                     wants: list[bool], top_n: list[int], num_ids: list[int]) -> Drawn:
    """Each row alone (a row's draw does not depend on the batch: the same tokens); a failing row gets
    token 0 and its reason in `failed`."""
    n, k, outs, failed = max(top_n), max(num_ids), [], {}
    dev = logits.device
    for i, row in enumerate(rows):
        mask = None if token_bitmask is None else token_bitmask[i: i + 1]
        try:
            out = _sample(logits[i: i + 1], [row], device, n, mask)
        except Exception as exc:  # noqa: BLE001 - reported on this row's request
            failed[i] = f"sampling failed: {type(exc).__name__}: {exc}"
            log.error("sampling failed for one row of a batch of %d: %s", len(rows), exc)
            out = SampleOutput(torch.zeros(1, dtype=torch.int64, device=dev), torch.zeros(1, device=dev),
                               torch.zeros((1, n), dtype=torch.int64, device=dev), torch.zeros((1, n), device=dev))
        ids = out.ids_logprobs if out.ids_logprobs is not None else torch.zeros((1, 0), device=dev)
        outs.append((out, torch.nn.functional.pad(ids, (0, k - ids.shape[1]))))
    return Drawn(torch.cat([o.tokens for o, _ in outs]), torch.cat([o.logprobs for o, _ in outs]),
                 torch.cat([o.top_ids for o, _ in outs]), torch.cat([o.top_logprobs for o, _ in outs]), wants, top_n,
                 torch.cat([ids for _, ids in outs]) if k else None, num_ids, failed)
