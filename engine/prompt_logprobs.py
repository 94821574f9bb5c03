"""Prompt log-probabilities (SGLang's input logprobs), computed during the chunked prefill.

For a request with `logprob_start_len` = s and a prompt x of L tokens, with z_q the raw logits at position q:

    token s:            none (SGLang's convention: it scores positions s … L−1, and position q predicts x_{q+1})
    token p, s < p < L: log_softmax(z_{p−1})[x_p], the top-N of log_softmax(z_{p−1}) (ties: lower id first)
                        and log_softmax(z_{p−1}) at the request's token_ids_logprob, in their order

(z_{L−1} predicts the first output token, which the sampler reports). Each forward of a prefill chunk also
returns the last block's output at the positions s … L−2 inside the chunk (`plan_rows`); `score_rows`
reduces them on the device a slice of rows at a time (the head's logits for at most `SLICE_ELEMS` values), so
a long prompt never holds `[T, vocab]` logits at once, and `ScoredRows.to_host` starts one asynchronous copy
that the scheduler reads with the step's tokens. `prompt_logprobs_ref` is the same from the plain model's
logits of every prompt position (engine/generate.py), for the tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sparsepd.engine.draw import host_event
from sparsepd.engine.request import PromptLogprobs, Request
from sparsepd.engine.sampling import TokenLogprobs, token_logprobs
from sparsepd.gpu_wait import GpuWait
from sparsepd.kernels.topk import topk_visible
from sparsepd.model.transformer import Transformer

SLICE_ELEMS = 2**26  # logits held at once while scoring (256 MiB in fp32)


@dataclass
class PromptRows:
    """The rows of one forward whose positions are scored, in row order, and whose they are."""

    rows: list[int]  # flat row in the forward
    targets: list[int]  # the prompt token each row's position predicts
    owners: list[tuple[Request, int]]  # (request, how many of the rows), in row order
    top_n: int  # the most top_logprobs any owner wants
    token_ids: list[list[int]]  # each row's owner's token_ids_logprob


def plan_rows(work: Sequence[tuple[Request, list[int]]]) -> PromptRows | None:
    """The rows to score in a forward of `work` (before the requests' num_computed moves); None when none."""
    rows, targets, owners, token_ids, row0 = [], [], [], [], 0
    for request, tokens in work:
        start = request.params.logprob_start_len
        if start is not None:
            first, prompt = request.num_computed, request.prompt_ids
            lo, hi = max(first, start), min(first + len(tokens), len(prompt) - 1)
            if hi > lo:
                rows += range(row0 + lo - first, row0 + hi - first)
                targets += prompt[lo + 1: hi + 1]
                owners.append((request, hi - lo))
                token_ids += [list(request.params.token_ids_logprob)] * (hi - lo)
        row0 += len(tokens)
    if not rows:
        return None
    return PromptRows(rows, targets, owners, max(r.params.top_logprobs for r, _ in owners), token_ids)


@dataclass
class ScoredRows:
    """`score_rows`' results on the device."""

    logprobs: torch.Tensor  # [n] fp32
    top_ids: torch.Tensor  # [n, N] int64
    top_logprobs: torch.Tensor  # [n, N] fp32
    ids_logprobs: torch.Tensor  # [n, K] fp32 (pads: junk)

    def to_host(self, gpu_wait: GpuWait = "spin") -> HostScores:
        """Start one asynchronous copy into (pinned, on CUDA) host memory."""
        cuda = self.logprobs.is_cuda
        floats = torch.cat([self.logprobs[:, None], self.top_logprobs, self.ids_logprobs], dim=1)  # [n, 1+N+K]
        host_floats = torch.empty(floats.shape, dtype=floats.dtype, pin_memory=cuda)
        host_floats.copy_(floats, non_blocking=True)
        host_ids = torch.empty(self.top_ids.shape, dtype=torch.int64, pin_memory=cuda)
        host_ids.copy_(self.top_ids, non_blocking=True)
        event = None
        if cuda:
            event = host_event(gpu_wait)
            event.record()
        return HostScores(host_floats, host_ids, event)


@dataclass
class HostScores:
    floats: torch.Tensor  # [n, 1 + N + K]
    top_ids: torch.Tensor  # [n, N]
    event: torch.cuda.Event | None

    def deliver(self, rows: PromptRows) -> None:
        """Wait for the copy; append each row's values to its request's prompt_logprobs (its own top-N and ids)."""
        if self.event is not None:
            self.event.synchronize()
        floats, ids, i = self.floats.tolist(), self.top_ids.tolist(), 0
        for request, count in rows.owners:
            n, k = request.params.top_logprobs, len(request.params.token_ids_logprob)
            request.prompt_logprobs += [
                TokenLogprobs(f[0], tuple(top[:n]), tuple(f[1: 1 + n]), tuple(f[1 + len(top): 1 + len(top) + k]))
                for f, top in zip(floats[i: i + count], ids[i: i + count], strict=True)]
            i += count


def score_rows(model: Transformer, hidden: torch.Tensor, rows: PromptRows,
               rows_per_slice: int | None = None) -> ScoredRows:
    """The module doc's values for the last block's output `hidden` `[n, hc, dim]` at `rows` (on its device).

    The head runs on `rows_per_slice` rows at a time (default: SLICE_ELEMS // vocab)."""
    device, n = hidden.device, hidden.shape[0]
    if n != len(rows.rows):
        raise ValueError(f"hidden has {n} rows, the plan {len(rows.rows)}")
    k = max(len(t) for t in rows.token_ids)
    targets = torch.tensor(rows.targets, dtype=torch.int64)
    ids = torch.tensor([t + [-1] * (k - len(t)) for t in rows.token_ids], dtype=torch.int64).reshape(n, k)
    if device.type == "cuda":
        targets = targets.pin_memory().to(device, non_blocking=True)
        ids = ids.pin_memory().to(device, non_blocking=True)
    step = rows_per_slice or max(1, SLICE_ELEMS // model.cfg.vocab_size)
    parts = []
    for begin in range(0, n, step):
        logp = torch.log_softmax(model.logits(hidden[begin: begin + step]), dim=-1)  # [m, V]
        m, vocab = logp.shape
        lp = logp.gather(1, targets[begin: begin + step, None])[:, 0]
        if rows.top_n > 0:
            visible = torch.full((m,), vocab, dtype=torch.int32, device=device)
            top_ids = topk_visible(logp, visible, rows.top_n).long()  # [m, N], ties: lower id first
        else:
            top_ids = torch.empty((m, 0), dtype=torch.int64, device=device)
        parts.append((lp, top_ids, logp.gather(1, top_ids), logp.gather(1, ids[begin: begin + step].clamp(min=0))))
    return ScoredRows(*(torch.cat(p) for p in zip(*parts, strict=True)))


def prompt_logprobs_ref(logits: torch.Tensor, prompt_ids: Sequence[int], start: int, top_n: int,
                        token_ids: Sequence[int] = ()) -> PromptLogprobs:
    """From the raw logits `[L, vocab]` of every prompt position (a plain forward over the prompt)."""
    if not 0 <= start < len(prompt_ids) or logits.shape[0] != len(prompt_ids):
        raise ValueError(f"start {start} and logits {list(logits.shape)} do not fit a prompt of {len(prompt_ids)}")
    return PromptLogprobs(start, tuple(token_logprobs(logits[p - 1], prompt_ids[p], top_n, token_ids)
                                       for p in range(start + 1, len(prompt_ids))))
