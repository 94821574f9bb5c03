"""Drawing a step's tokens on the device and reading them on the host once.

`draw` samples every row of a step's logits in one batch on the logits' device (kernels/sampling.py;
a plain argmax when every row is greedy with nothing banned, no penalty, bias or grammar and no
log-probabilities wanted; penalties read each row's token history from its slot, engine/penalties.py;
grammar rows are masked by the step's token bitmask, engine/grammar.py), and
`Drawn.to_host` starts one asynchronous copy of the tokens (and, when asked for, one of the
log-probabilities: the drawn token's, the top ones, those of the rows' token_ids_logprob) into pinned host
memory. `HostDraw.result()` waits for that copy: the one host sync of
a step, which with the scheduler's overlap happens after the next step is already queued.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsepd.engine.penalties import penalty_tensors
from sparsepd.engine.sampling import Sampler, SamplingParams, TokenLogprobs, sampling_tensors
from sparsepd.kernels.sampling import sample_batch


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

    def to_host(self) -> HostDraw:
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
            event = torch.cuda.Event()
            event.record()
        host = HostDraw(tokens, floats, ids, event)
        if floats is not None:
            host = _PerRowLogprobs(host, self.wants_logprobs, self.top_n, self.num_ids or [0] * len(self.top_n))
        return host


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
        return Drawn(logits.argmax(-1), None, None, None, wants, top_n)
    params = sampling_tensors(rows, device)
    params.token_bitmask = token_bitmask
    if any(p.penalized for p, *_ in rows):
        params.penalties = penalty_tensors(rows, device)
    out = sample_batch(logits, params)
    return Drawn(out.tokens, out.logprobs, out.top_ids, out.top_logprobs, wants, top_n, out.ids_logprobs,
                 [len(p.token_ids_logprob) for p, *_ in rows])
