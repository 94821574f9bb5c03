"""Speculative decoding: a drafter proposes k tokens per decoding request, one forward verifies them all.

The step (a `Scheduler` whose step is synchronous: no overlap) is receive → schedule → verify → draft:

1. schedule: every decoding request gets its last token plus its drafts (at most k, and only as many as its
   max_new_tokens, its held pages and max_seq_len allow: page growth sees accepted tokens only), then prefill
   chunks with the rest of the budget. Requests whose next token depends on the tokens before it in ways the
   batched draw cannot see within one forward (penalties over the output history, a grammar) decode without
   drafts.
2. verify: the undo rows of the drafted positions are saved (engine/undo.py), one forward computes the k+1
   positions of each decoding request and keeps the last block's output at every row; the head runs on each
   request's k+1 rows and row j is drawn as output token n+j (n = tokens so far) with the request's own
   sampler: greedy rows take the argmax, sampled rows the counter-based draw of (seed, n+j), exactly what the
   engine without speculation draws for that token. Drafts are accepted while draft j equals the token drawn
   at row j; the tokens drawn up to the first mismatch are the output (1 … k+1 tokens), delivered one by one
   through the same path as without speculation (grammar, stops, min/max tokens, log-probabilities), stopping
   at a finish. The rows of positions past the last delivered token are written back.
3. draft: the drafter (engine/drafter.py) advances over the positions now final (prompt chunks and delivered
   tokens) and proposes the next drafts.

Why the output is exact. Row j's logits are the model's after the same tokens as without speculation whenever
row j is used (all drafts before it were accepted, i.e. equal to the tokens drawn), and the draw of token n+j
depends only on those logits and (seed, n+j) (kernels/sampling.py). For greedy rows that is the longest matching
prefix; for sampled rows it is rejection sampling with a point-mass draft q = δ_d: the draft is accepted with
probability P(x = d) = p(d) = min(1, p(d)/q(d)), and on a rejection the token is x conditioned on x ≠ d, i.e. the
residual (p − q)⁺ renormalized, so the target distribution is preserved, and a seeded request draws the same
tokens with or without speculation.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from sparsepd.engine.drafter import Drafter, DraftSpan
from sparsepd.engine.draw import draw, plain_draw
from sparsepd.engine.grammar import token_bitmask
from sparsepd.engine.prompt_logprobs import plan_rows, score_rows
from sparsepd.engine.request import Request, StepOutput
from sparsepd.engine.runner import Runner, to_device
from sparsepd.engine.scheduler import Scheduler, all_plain
from sparsepd.engine.undo import Span, UndoLog, max_span, undo_targets
from sparsepd.engine.undo_graphs import UndoGraphs


@dataclass
class SpeculativeStats:
    """Drafts proposed and accepted since start; accept_lengths[a]: verifications that accepted a drafts."""

    num_steps: int
    verifications: int = 0  # request-steps that verified at least one draft
    drafted: int = 0
    accepted: int = 0
    accept_lengths: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.accept_lengths = self.accept_lengths or [0] * (self.num_steps + 1)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    def record(self, drafted: int, accepted: int) -> None:
        self.verifications += 1
        self.drafted += drafted
        self.accepted += accepted
        self.accept_lengths[accepted] += 1


@dataclass
class _Verified:
    """One sampling request of a verification step."""

    request: Request
    start: int  # its num_computed before the step
    rows: Sequence[int]  # its rows in the forward (k'+1 for a decoding request, its last row otherwise)
    drafts: list[int]
    decoding: bool


def speculates(request: Request) -> bool:
    """Whether a request decodes with drafts (see the module doc, point 1)."""
    return (request.grammar is None and not request.params.uses_history and not request.stateless
            and request.slot is not None)


class SpeculativeScheduler(Scheduler):
    def __init__(self, runner: Runner, drafter: Drafter, num_steps: int, **kwargs):
        super().__init__(runner, overlap=False, **kwargs)
        limit = max_span(runner.pools) - 1
        if not 1 <= num_steps <= limit:
            raise ValueError(f"speculative_num_steps must lie in [1, {limit}] for this model (k + 1 positions "
                             f"fit its smallest ring), got {num_steps}")
        self.drafter, self.num_steps = drafter, num_steps
        self.stats = SpeculativeStats(num_steps)
        self._undo_targets = undo_targets(runner.pools)
        verify = runner.verify_graphs  # with the verification graphs, the undo log's own (engine/undo_graphs.py)
        self._undo_graphs = UndoGraphs(runner.pools, self._undo_targets, num_steps, verify.buckets,
                                       verify.steps.capture) if verify is not None else None

    def step(self, lock: threading.Lock | None = None) -> list[StepOutput]:
        self.released.lock = lock  # let go of during the verification, the wait for its tokens and the drafts
        self.admission.admit_waiting(self.waiting, self.running)
        read_early = self.growth.grow(self.running, self.waiting, self._read_in_flight)
        scheduled = self._schedule()
        return read_early + (self._verify(scheduled) if scheduled else [])

    # --- schedule ----------------------------------------------------------------------------------
    def _schedule(self) -> list[tuple[Request, list[int]]]:
        budget, decoding, prefilling = self.max_batch_tokens, [], []
        for r in self.running:  # one pass: `prefilling` asked once a request
            if r.prefilling:
                prefilling.append(r)
            elif budget and r.finish_reason is None and len(r.output_ids) < r.params.max_new_tokens:
                decoding.append(r)
                budget -= 1
        out = []
        for r in decoding:  # drafts from what the one-token-each pass left
            tokens = r.next_tokens(1)
            if r.draft_ids:
                drafts = self._drafts_for(r, budget)
                budget -= len(drafts)
                tokens = tokens + drafts
            out.append((r, tokens))
        for r in prefilling:
            if budget <= 0:
                break
            tokens = r.next_tokens(budget)
            out.append((r, tokens))
            budget -= len(tokens)
        return out

    def _drafts_for(self, r: Request, room: int) -> list[int]:
        if not r.draft_ids or not speculates(r):
            return []
        page_room = len(r.pages) * self.pools.geometry.page_size - 1 - r.num_computed
        n = min(len(r.draft_ids), self.num_steps, room, r.params.max_new_tokens - len(r.output_ids) - 1, page_room,
                self.runner.model.cfg.max_seq_len - 1 - r.num_computed)
        return r.draft_ids[:max(n, 0)]

    # --- verify --------------------------------------------------------------------------------------
    def _verify(self, scheduled: list[tuple[Request, list[int]]]) -> list[StepOutput]:
        starts = [r.num_computed for r, _ in scheduled]
        verified = self._sampling(scheduled)  # (before num_computed moves)
        drafting = [v for v in verified if v.drafts]
        spans = [Span(v.request.slot, v.request.pages, v.start + 1, v.start + 1 + len(v.drafts)) for v in drafting]
        undo = (self._undo_graphs.log(spans) if self._undo_graphs is not None else None) or \
            UndoLog(self.pools, spans, self._undo_targets)
        prompt_rows = plan_rows(scheduled)
        capturing = self.prefix.plan(scheduled) if self.prefix is not None else []
        num_rows = sum(len(t) for _, t in scheduled)
        flat = [r for v in verified for r in v.rows]
        try:  # logits [len(flat), V] fp32 at the rows that draw; the last block's output [T, hc, dim] at every row
            with self.released:
                logits, hidden = self.runner.forward(scheduled, final_rows=list(range(num_rows)),
                                                     logit_rows=flat or None)
        except BaseException:
            if capturing:
                self.prefix.cancel(capturing)
            raise
        captures = {id(r): r.captures for r in capturing}  # (commit clears them; the drafter's forward needs them)
        saved = self.prefix.commit(capturing) if capturing else []
        outputs: list[StepOutput] = []
        if prompt_rows is not None:  # before the tokens, as without speculation
            index = to_device(prompt_rows.rows, hidden.device)
            score_rows(self.runner.model, hidden[index], prompt_rows).to_host(self.gpu_wait).deliver(prompt_rows)
        decoding = {id(v.request) for v in verified if v.decoding}
        for request, tokens in scheduled:  # prefill chunks; a decoding request moves by what it delivers (_accept)
            if id(request) in decoding:
                continue
            request.num_computed += len(tokens)
            if request.cache_at is not None and request.num_computed >= request.cache_at:
                request.cache_at = request.cache_hashes = None
        verified = self._with_forks(verified)
        kept = self._accept(verified, logits, outputs)
        undo.restore([kept.get(id(v.request), v.start) for v in drafting])
        # before the drafts, which run with the caller's lock let go of (engine/scheduler.py): the list is whole then
        self.running[:] = [r for r in self.running if r.finish_reason is None]
        self._draft(scheduled, starts, hidden, captures)
        if saved:  # the MTP layer's ring at each boundary, written into the capture slots by the drafter's forward
            self.prefix.cache.store.save_extra(self.pools, saved)
        return outputs

    def _sampling(self, scheduled: list[tuple[Request, list[int]]]) -> list[_Verified]:
        """The requests that draw in this forward with their rows in it: every decoding request's k'+1, the
        last row of a prefill chunk that completes its request's known tokens."""
        verified, row = [], 0
        for request, tokens in scheduled:
            if not request.prefilling:  # a decoding request: its last token and drafts
                verified.append(_Verified(request, request.num_computed, list(range(row, row + len(tokens))),
                                          tokens[1:], True))
            elif request.num_computed + len(tokens) >= request.num_known:
                verified.append(_Verified(request, request.num_computed, [row + len(tokens) - 1], [], False))
            row += len(tokens)
        return verified

    def _with_forks(self, verified: list[_Verified]) -> list[_Verified]:
        """`verified` with `rows` as rows of the logits, plus the forks that draw their first token from their
        source's row; without the requests that ended meanwhile."""
        out, index = list(verified), 0
        for v in out:  # (in place: the forward's rows are not needed after it)
            n = len(v.rows)
            v.rows = range(index, index + n)
            index += n
        rows, sampling = [v.rows[-1] for v in out], [v.request for v in out]
        self._fork(rows, sampling)  # forks draw their first token from their source's row
        out += [_Verified(f, f.num_computed, [r], [], False)
                for r, f in zip(rows[len(out):], sampling[len(out):], strict=True)]
        return [v for v in out
                if v.request.finish_reason is None and (v.request.slot is not None or v.request.stateless)]

    def _accept(self, verified: list[_Verified], logits: torch.Tensor, outputs: list[StepOutput]) -> dict[int, int]:
        """Draw every row, accept each request's longest matching prefix and deliver it; each decoding request's
        positions that stay computed (start + tokens delivered)."""
        kept: dict[int, int] = {}
        if not verified:
            return kept
        device, eos = self.pools.device, self.runner.model.cfg.eos_id
        flat = [r for v in verified for r in v.rows]
        if flat != list(range(logits.shape[0])):  # forks share their source's row; ended requests are gone
            logits = logits[to_device(flat, logits.device)]
        if all_plain([v.request for v in verified]):  # (row j of a request is its token n + j ≥ n: plain too)
            drawn = plain_draw(logits)
        else:
            table = [(v.request.params, v.request.sampler, len(v.request.output_ids) + j, eos)
                     for v in verified for j in range(len(v.rows))]
            grammars = [v.request.grammar for v in verified for _ in v.rows]
            drawn = draw(logits, table, device, token_bitmask(grammars, logits.shape[1], device))
        failed = drawn.failed
        with self.released:
            tokens, logprobs = drawn.to_host(self.gpu_wait).result()
        first, last_slots, last_tokens = 0, [], []
        for v in verified:
            request, n = v.request, len(v.rows)
            rows = range(first, first + n)
            first += n
            bad = [i for i in rows if i in failed] if failed else None
            if bad:
                request.error = f"request {request.request_id}: {drawn.failed[bad[0]]}"
                request.finish_reason = "error"
                outputs.append(StepOutput(request.request_id, -1, "error", error=request.error))
                self._release(request)
                kept[id(request)] = v.start
                continue
            drawn_tokens = tokens[first - n: first]
            accepted = 0
            while accepted < len(v.drafts) and v.drafts[accepted] == drawn_tokens[accepted]:
                accepted += 1
            if v.drafts:
                self.stats.record(len(v.drafts), accepted)
                request.spec_drafted += len(v.drafts)
                request.spec_accepted += accepted
            if request.slot is not None:  # its next input (the device copy) and penalty history
                last_slots.append(request.slot)
                last_tokens.append(drawn_tokens[accepted])
            delivered = 0
            for j in range(accepted + 1):
                if request.finish_reason is not None:
                    break
                self._emit(request, drawn_tokens[j], logprobs[first - n + j] if logprobs is not None else None,
                           outputs)
                delivered += 1
            if v.decoding:
                request.num_computed = v.start + delivered
            kept[id(request)] = request.num_computed
        if last_slots:
            self.runner.remember_host_tokens(last_slots, last_tokens)
        return kept

    # --- draft ---------------------------------------------------------------------------------------
    def _draft(self, scheduled: list[tuple[Request, list[int]]], starts: list[int], hidden: torch.Tensor,
               captures: dict[int, tuple[tuple[int, int], ...]] | None = None) -> None:
        """Advance the drafter over the positions now final (a prompt chunk, a verification's delivered part);
        store the next drafts in each request that decodes next. captures: request id(…) → the prefix-cache
        boundary snapshots its chunk took in this step's forward (the drafter's forward writes them too)."""
        spans, row = [], 0
        for (request, tokens), start in zip(scheduled, starts, strict=True):
            first, row = row, row + len(tokens)
            request.draft_ids = []
            count = request.num_computed - start
            prompt = len(request.prompt_ids)
            if request.finish_reason is not None or count <= 0 or start + count >= prompt + len(request.output_ids) \
                    or not speculates(request):
                continue
            if start + 1 >= prompt:  # the tokens after each position, without a copy of prompt + output
                next_ids = request.output_ids[start + 1 - prompt: start + count + 1 - prompt]
            else:
                next_ids = (request.prompt_ids + request.output_ids)[start + 1: start + count + 1]
            spans.append(DraftSpan(request, start, list(range(first, first + count)), next_ids,
                                   propose=not request.prefilling,
                                   captures=(captures or {}).get(id(request), ())))
        if spans:
            with self.released:  # the drafter's own pools and the spans' requests
                drafted = self.drafter.draft(spans, hidden, self.num_steps)
            for request, drafts in drafted.items():
                request.draft_ids = drafts
