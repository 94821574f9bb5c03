"""The single-process scheduler: waiting queue, admission by free pages and slots, chunked prefill under a
token budget, continuous-batching decode, stop conditions, finish and free.

One `step()` is receive → schedule → run → postprocess, as in nano-vllm: admit what fits, give every
decoding request one token and the rest of the budget to prefill chunks (oldest first), run one forward,
sample the requests whose known tokens are all computed, and free the finished ones. This is also the
colocated serving mode that the disaggregated service is compared against. A prefill chunk of a request
that asks for prompt log-probabilities is scored in the same step (engine/prompt_logprobs.py); requests
that do not ask take the plain path.

Pages on demand: a request is admitted with the pages of its known tokens and the next one and gets one more at
each page boundary it decodes across; when no page is free the newest decoding requests are retracted (state to
host memory, back to the head of the waiting queue) and resumed when admitted again.

With a prefix cache (engine/prefix_cache.py, on the workers that prefill), admission restores a request from the
entry of its longest cached page-aligned prefix and prefills only the rest; the chunk that reaches the last page
boundary before a request's last known token ends there, and the state at that boundary becomes an entry.

With overlap, step N+1's forward and draw are queued before step N's tokens are read. A request with a
grammar needs token N accepted by its matcher before step N+1's mask can be built (engine/grammar.py), so
when the step samples such a request the order becomes: launch forward N+1 → read and postprocess step N →
build the masks → draw N+1 and start its copy. The forward still hides the host work of step N; only the
draw waits. Without a grammar in the step nothing changes (no extra sync).
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

import torch

from sparsepd.engine.draw import InFlightStep, draw
from sparsepd.engine.grammar import token_bitmask
from sparsepd.engine.pools import OutOfCapacity
from sparsepd.engine.prefix_cache import CacheEntry, PrefixCache
from sparsepd.engine.prompt_logprobs import plan_rows, score_rows
from sparsepd.engine.request import PENDING, PromptLogprobs, Request, StepOutput
from sparsepd.engine.runner import Runner, to_device
from sparsepd.engine.sampling import finish_reason
from sparsepd.engine.state_io import copy_state, export_state, restore_tensors, state_num_bytes

log = logging.getLogger("sparsepd.engine")


@dataclass
class LaunchedForward:
    """A step's forward, queued on the device, not yet drawn from: its logits and the requests that sample."""

    scheduled: list
    logits: torch.Tensor | None  # [len(sampled), V] fp32, None when no request samples
    sampled: list
    prompt: tuple | None = None  # (PromptRows, HostScores): prompt log-probabilities scored in this step

    @property
    def has_grammar(self) -> bool:
        return any(r.grammar is not None for r in self.sampled)


class Scheduler:
    def __init__(self, runner: Runner, max_batch_tokens: int | None = None, overlap: bool = False,
                 cache: PrefixCache | None = None, max_retracted_bytes: int | None = None):
        """max_retracted_bytes: host memory the states of retracted requests may take (None: unbounded)."""
        self.runner, self.pools, self.cache = runner, runner.pools, cache
        self.max_retracted_bytes = max_retracted_bytes
        self.max_batch_tokens = max_batch_tokens or runner.pools.geometry.max_batch_tokens
        if self.max_batch_tokens > runner.pools.geometry.max_batch_tokens:
            raise ValueError(f"max_batch_tokens={self.max_batch_tokens} exceeds the pools' scratch rows "
                             f"{runner.pools.geometry.max_batch_tokens}")
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.overlap = overlap
        self._in_flight: InFlightStep | None = None  # launched, not yet read (overlap only)
        self.retractions = 0  # requests moved back to waiting (state to host memory) for want of a page

    # --- receive ---------------------------------------------------------------------------------
    def add(self, request: Request) -> None:
        """Queue a request; raise OutOfCapacity if it could never fit, ValueError if it is malformed."""
        cfg = self.runner.model.cfg
        if not request.prompt_ids:
            raise ValueError(f"request {request.request_id}: empty prompt")
        if request.max_len > cfg.max_seq_len:
            raise ValueError(f"request {request.request_id}: prompt {len(request.prompt_ids)} + max_new_tokens "
                             f"{request.params.max_new_tokens} exceeds max_seq_len={cfg.max_seq_len}")
        need = self._to_reserve(request)
        pages = sum(self.pools.pages_for(r.max_len) for r in need)  # all it may grow to: then it can never finish
        if pages > self.pools.pages.capacity or len(need) > self.pools.slots.capacity:
            raise OutOfCapacity(f"request {request.request_id} needs {pages} pages and {len(need)} slots, the pools "
                                f"have {self.pools.pages.capacity} and {self.pools.slots.capacity}")
        self.waiting.append(request)

    def abort(self, request_id: str) -> bool:
        """End a request wherever it is and free what it holds; False if unknown or already finished."""
        for r in list(self.waiting):
            if r.request_id == request_id:
                self.waiting.remove(r)
                self._release_forks(r)
                return True
        for r in self.running:
            if r.request_id == request_id:
                self._release(r)
                self._release_forks(r)
                self.running.remove(r)
                return True
        for r in [*self.waiting, *self.running]:
            for fork in r.forks:
                if fork.request_id == request_id:  # not forked yet
                    r.forks.remove(fork)
                    self._release(fork)
                    return True
        return False

    def _release_forks(self, request: Request) -> None:
        """Forks not yet forked go with their source (the router ends all n of a request together)."""
        for fork in request.forks:
            self._release(fork)
        request.forks = []

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # --- schedule, run, postprocess ---------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        """One step. With overlap, this step's forward and sampling are launched before the previous step's
        results are read (they are usually ready by then), so the host work of a step hides behind the GPU;
        the outputs returned are the previous step's."""
        self._admit()
        read_early = self._grow()  # outputs of a step read ahead of time to make room (overlap)
        scheduled = self._schedule()
        if not self.overlap:
            return read_early + (self._postprocess(self._launch(scheduled)) if scheduled else [])
        previous, self._in_flight, outputs = self._in_flight, None, []
        if scheduled:
            forward = self._forward(scheduled)
            if previous is not None and forward.has_grammar:  # this step's masks need the previous step's tokens
                outputs, previous = self._postprocess(previous), None
            self._in_flight = self._draw(forward)
        return read_early + (self._postprocess(previous) if previous is not None else outputs)

    # --- pages on demand ------------------------------------------------------------------------------
    def initial_pages(self, request: Request) -> int:
        """Pages a request gets when it is admitted: its known tokens and the next one (a prefill, then its first
        decode step; a retracted request's state and its next step). Decoding adds one page at each page
        boundary (`_grow`)."""
        return self.pools.pages_for(request.num_known + 1)

    def headroom(self) -> int:
        """Free pages an admission leaves for the running set's growth: one per decoding request (each crosses a
        page boundary at least once every page_size steps), so that retraction stays rare."""
        return sum(1 for r in self.running if not r.prefilling and r.finish_reason is None)

    def ensure_pages(self, request: Request, num_tokens: int) -> None:
        """Pages for the request's first num_tokens positions (raises OutOfCapacity, holding what it held)."""
        need = self.pools.pages_for(num_tokens) - len(request.pages)
        if need > 0:
            if self.cache is not None:
                self.cache.make_room(need)
            request.pages += self.pools.pages.allocate(need)

    def _grow(self) -> list[StepOutput]:
        """Every request about to decode gets the page its next token's KV goes to. When none is free: read the
        step in flight (overlap; the outputs are returned, its finished requests free their pages), then retract
        the newest decoding requests (`_retract`) until the page is there; a request alone in a full pool
        fails (finish "error")."""
        read_early: list[StepOutput] = []
        for r in list(self.running):  # oldest first
            # A request retracted or failed in this loop has no slot any more, one finished by reading the step in
            # flight has its finish reason: no membership test on `running` (O(batch) each, O(batch²) a step).
            while r.finish_reason is None and not r.prefilling and r.slot is not None \
                    and len(r.output_ids) + r.num_pending < r.params.max_new_tokens:
                try:
                    self.ensure_pages(r, r.num_computed + 1)
                    break
                except OutOfCapacity:
                    pass
                if self._in_flight is not None:
                    read_early += self._postprocess(self._in_flight)
                    self._in_flight = None
                    continue
                victim = next((v for v in reversed(self.running) if v is not r and not v.prefilling and not v.forks
                               and v.finish_reason is None and v.slot is not None), None)
                if victim is None:
                    r.finish_reason = "error"
                    r.error = (f"request {r.request_id}: no KV page free for position {r.num_computed} and nothing "
                               f"to retract (the pool holds {self.pools.pages.capacity} pages)")
                    read_early.append(StepOutput(r.request_id, -1, "error", error=r.error))
                    self._release(r)
                    self.running.remove(r)
                    break
                read_early += self._retract(victim)
        return read_early

    def _retract(self, request: Request) -> list[StepOutput]:
        """Move a decoding request back to the head of the waiting queue: its state copied to host memory, its
        slot and pages freed; admitted again, it gets them back with the state and goes on with its next token
        (nothing repeated or lost, its random stream where it was). When its state would take the retracted
        requests' host memory past max_retracted_bytes, it fails instead (finish "error", `overloaded`): the
        newest decoding request, as the one retracted would be, rather than memory without bound."""
        num_bytes = state_num_bytes(self.pools, request)
        held = sum(t.nbytes for r in self.waiting if r.offloaded is not None for t in r.offloaded.values())
        if self.max_retracted_bytes is not None and held + num_bytes > self.max_retracted_bytes:
            request.finish_reason, request.error = "error", (
                f"request {request.request_id}: no KV page free for position {request.num_computed}, and retracting "
                f"it ({num_bytes} bytes of state) would take the retracted requests' host memory to "
                f"{held + num_bytes} bytes, over the bound of {self.max_retracted_bytes} (--max-retracted-memory)")
            log.warning("failed instead of retracted: %s", request.error, extra={"request_id": request.request_id})
            self._release(request)
            self.running.remove(request)
            return [StepOutput(request.request_id, -1, "error", error=request.error, overloaded=True)]
        _, request.offloaded = export_state(self.pools, request)
        self._release(request)
        self.running.remove(request)
        self.waiting.appendleft(request)
        self.retractions += 1
        log.warning("retracted after %d tokens: no KV page free; its state waits in host memory",
                    len(request.output_ids), extra={"request_id": request.request_id})
        return []

    def _admit(self) -> None:
        headroom = self.headroom()  # counted once: an admitted request adds to it only when it resumes decoding
        while self.waiting:
            request = self.waiting[0]
            need = self._to_reserve(request)
            pages = sum(self.initial_pages(r) for r in need) + headroom
            if self.cache is not None and self.pools.slots.can_allocate(len(need)):
                self.cache.make_room(pages)
            if not (self.pools.slots.can_allocate(len(need)) and self.pools.pages.can_allocate(pages)):
                return
            self.waiting.popleft()
            self.admit(request)
            headroom += not request.prefilling  # a retracted request resumes decoding at once

    def admit(self, request: Request) -> None:
        """Give a request (and its forks) a slot and pages for all its tokens and make it run (raises
        OutOfCapacity)."""
        done = []
        try:
            for r in self._to_reserve(request):
                self.reserve(r)
                done.append(r)
        except OutOfCapacity:
            for r in done:
                self._release(r)
            raise
        self.running.append(request)

    @staticmethod
    def _to_reserve(request: Request) -> list[Request]:
        """The request and those of its forks that need a slot and pages here and hold none yet."""
        return [request, *(f for f in request.forks if f.slot is None and not f.stateless)]

    def reserve(self, request: Request, headroom: int = 0, lookup: bool = True) -> None:
        """A slot and its initial pages (`initial_pages`) for a request, without running it (raises OutOfCapacity,
        also when fewer than `headroom` pages would be left); with a prefix cache, its longest cached prefix
        restored (the entry's pages shared, its slot copied; not when `lookup` is False: a reservation whose
        prompt comes later, `restore_prefix`); a retracted request's state copied back."""
        if self.pools.pages_for(request.max_len) > self.pools.pages.capacity:
            raise OutOfCapacity(f"request {request.request_id} may grow to {self.pools.pages_for(request.max_len)} "
                                f"pages, the pool has {self.pools.pages.capacity} in all")
        slot = self.pools.slots.allocate(1)[0]
        entry = self._lookup(request) if lookup else None
        shared = list(entry.pages) if entry is not None else []
        self.pools.pages.share(shared)  # before make_room: evicting the entry now frees none of these
        need = self.initial_pages(request) - len(shared)
        try:
            if self.cache is not None:
                self.cache.make_room(need + headroom)
            if headroom and not self.pools.pages.can_allocate(need + headroom):
                raise OutOfCapacity(f"needs {need} pages and leaves {headroom} for the running requests' growth; "
                                    f"{self.pools.pages.num_free} of {self.pools.pages.capacity} are free")
            request.pages = shared + self.pools.pages.allocate(need)
        except OutOfCapacity:
            self.pools.pages.free(shared)
            self.pools.slots.free([slot])
            raise
        request.slot = slot
        self.pools.reset_slot(slot)
        if request.offloaded is not None:  # retracted: its state back from host memory
            restore_tensors(self.pools, request, request.offloaded)
            request.offloaded = None
            return
        if lookup and self.cache is not None and self._cacheable(request):
            self._start_cached(request, entry)

    def restore_prefix(self, request: Request) -> int:
        """A reserved request whose prompt is known now (the colocated worker's): restore its longest cached
        prefix into the slot and pages it holds (the entry's pages replace its first ones); the tokens
        restored."""
        if self.cache is None or not self._cacheable(request) or request.slot is None:
            return 0
        entry = self._lookup(request)
        if entry is not None:
            k = len(entry.pages)
            self.pools.pages.share(list(entry.pages))
            self.pools.pages.free(request.pages[:k])
            request.pages[:k] = list(entry.pages)
        self._start_cached(request, entry)
        return request.cached_tokens

    def _start_cached(self, request: Request, entry: CacheEntry | None) -> None:
        """The entry's snapshot into the request's slot (when there is one; its pages are already the request's
        first ones), and where the request's own entry will be taken."""
        if entry is not None:
            self.cache.restore(entry, request.slot)
            request.num_computed = request.cached_tokens = entry.num_tokens
            request.restored_from = entry.key
        self.cache.stats.miss_tokens += request.num_known - request.num_computed
        at = self.cache.boundary(request.num_known)
        request.cache_at = at if at > request.num_computed else None

    def _cacheable(self, request: Request) -> bool:
        return not request.stateless and request.num_computed == 0 and request.prefilling

    def _lookup(self, request: Request) -> CacheEntry | None:
        """The cache entry to restore the request from: its longest cached page-aligned prefix that leaves a
        token to compute (the first draw needs its logits) and no prompt position it must score."""
        if self.cache is None or not self._cacheable(request):
            return None
        limit = request.num_known - 1
        if request.params.logprob_start_len is not None:
            limit = min(limit, request.params.logprob_start_len)
        return self.cache.match(request.prompt_ids + request.output_ids, limit)

    def activate(self, request: Request) -> None:
        """Run a reserved request whose state has been imported (the decode worker's admission)."""
        self.running.append(request)

    def release(self, request: Request) -> None:
        """Free a request's slot and pages (a reservation that never ran, or any request)."""
        self._release(request)

    def _schedule(self) -> list[tuple[Request, list[int]]]:
        """Every decoding request one token (PENDING when it is the one still being sampled on the GPU), then
        prefill chunks (oldest first) with the rest of the budget. A request whose next token is its last
        (max_new_tokens, counting the one in flight) is not scheduled: it finishes when that one is read."""
        budget = self.max_batch_tokens
        out = []
        for r in self.running:
            if budget == 0:
                break
            if r.prefilling or r.finish_reason is not None:
                continue
            if len(r.output_ids) + r.num_pending >= r.params.max_new_tokens:
                continue
            out.append((r, [PENDING] if r.num_pending else r.next_tokens(1)))
            budget -= 1
        for r in self.running:
            if r.prefilling and budget > 0:
                cut = r.cache_at - r.num_computed if r.cache_at is not None else budget  # end there: cache it
                tokens = r.next_tokens(min(budget, cut))
                out.append((r, tokens))
                budget -= len(tokens)
        return out

    def _launch(self, scheduled: list[tuple[Request, list[int]]]) -> InFlightStep:
        """Run the forward and sample on the device; start the copy of the sampled tokens to the host."""
        return self._draw(self._forward(scheduled))

    def _forward(self, scheduled: list[tuple[Request, list[int]]]) -> LaunchedForward:
        """Queue the forward (scoring the prompt rows of requests that asked for prompt log-probabilities); keep
        the logits of the requests whose known tokens are now all computed, and of their forks."""
        prompt_rows, prompt = plan_rows(scheduled), None
        if prompt_rows is None:
            logits = self.runner.forward(scheduled)
        else:
            logits, hidden = self.runner.forward(scheduled, final_rows=prompt_rows.rows)
            prompt = (prompt_rows, score_rows(self.runner.model, hidden, prompt_rows).to_host())
        rows, sampling = [], []
        for i, (request, tokens) in enumerate(scheduled):
            request.num_computed += len(tokens)
            if request.cache_at is not None and request.num_computed == request.cache_at:
                known = request.prompt_ids + request.output_ids
                self.cache.insert(known[: request.cache_at], request.pages, request.slot, request.restored_from)
                request.cache_at = None
            if request.num_computed >= request.num_known + request.num_pending:
                rows.append(i)
                sampling.append(request)
        if not sampling:
            return LaunchedForward(scheduled, None, [], prompt)
        self._fork(rows, sampling)
        if rows != list(range(logits.shape[0])):
            logits = logits[to_device(rows, logits.device)]
        return LaunchedForward(scheduled, logits, sampling, prompt)

    def _fork(self, rows: list[int], sampling: list[Request]) -> None:
        """Add the forks of requests drawing their first token now: the same logits row, their own samplers.
        A fork with a slot gets a copy of its source's state (stream-ordered after this forward, before the next
        writes the source's first token) and runs from here on like any request."""
        for i, r in enumerate(list(sampling)):
            if not r.forks or r.output_ids or r.num_pending:
                continue
            for fork in r.forks:
                fork.sampler.history, fork.sampler.prompt_id_set = r.sampler.history, r.sampler.prompt_id_set
                fork.prompt_logprobs = r.prompt_logprobs  # the same list: this step's scores land in it
                if fork.slot is not None:
                    copy_state(self.pools, r, fork)
                    self.running.append(fork)
                else:
                    fork.num_computed = r.num_computed
                rows.append(rows[i])
                sampling.append(fork)
            r.forks = []

    def _draw(self, forward: LaunchedForward) -> InFlightStep:
        """Sample the forward's rows (within their grammars' masks) and start the tokens' copy to the host. A
        request that ended since the forward was queued (read in between, under overlap) is not drawn."""
        live = [i for i, r in enumerate(forward.sampled)
                if r.finish_reason is None and (r.slot is not None or r.stateless)]
        sampling = [forward.sampled[i] for i in live]
        if not sampling:
            return InFlightStep(forward.scheduled, [], None, forward.prompt)
        logits = forward.logits
        if len(live) < logits.shape[0]:
            logits = logits[to_device(live, logits.device)]
        eos, device = self.runner.model.cfg.eos_id, self.runner.pools.device
        table = [(r.params, r.sampler, len(r.output_ids) + r.num_pending, eos) for r in sampling]
        mask = token_bitmask([r.grammar for r in sampling], logits.shape[1], device)
        drawn = draw(logits, table, device, mask)
        for row, why in drawn.failed.items():  # fails that request alone, in _postprocess
            sampling[row].error = f"request {sampling[row].request_id}: {why}"
        kept = [i for i, r in enumerate(sampling) if r.slot is not None]  # stateless forks have no slot
        tokens = drawn.tokens if len(kept) == len(sampling) else drawn.tokens[to_device(kept, logits.device)]
        self.runner.remember_tokens([sampling[i].slot for i in kept], tokens)
        for r in sampling:
            r.num_pending += 1
        return InFlightStep(forward.scheduled, sampling, drawn.to_host(), forward.prompt)

    def _postprocess(self, step: InFlightStep) -> list[StepOutput]:
        if step.prompt is not None:  # before the tokens: a final chunk's values precede its first token
            rows, host = step.prompt
            host.deliver(rows)
        if not step.sampled:
            return []
        eos = self.runner.model.cfg.eos_id
        outputs = []
        tokens, logprobs = step.host.result()  # waits for this step's copy (one sync a step)
        for i, request in enumerate(step.sampled):
            request.num_pending -= 1
            if request.finish_reason is not None or (request.slot is None and not request.stateless):
                continue  # finished or aborted while this step ran: its token is dropped
            if request.error:
                request.finish_reason = "error"
                outputs.append(StepOutput(request.request_id, -1, "error", error=request.error))
                self._release(request)
                continue
            params, token = request.params, tokens[i]
            request.sampler.advance()
            if request.grammar is not None and not request.grammar.accept(token):
                request.finish_reason = "error"  # a masked token was drawn: a bug, this request's alone
                request.error = (f"internal error: token {token} was drawn at output position "
                                 f"{len(request.output_ids)} but the request's grammar does not allow it")
                outputs.append(StepOutput(request.request_id, token, "error", error=request.error))
                self._release(request)
                continue
            request.output_ids.append(token)
            lp = logprobs[i] if logprobs is not None else None
            if lp is not None:
                request.output_logprobs.append(lp)
            request.finish_reason = finish_reason(token, len(request.output_ids), params, eos)
            if request.grammar is not None and request.grammar.terminated:
                request.finish_reason = "stop"  # the grammar accepted its stop token (even with ignore_eos)
            prompt = None
            if params.logprob_start_len is not None and len(request.output_ids) == 1:
                prompt = PromptLogprobs(params.logprob_start_len, tuple(request.prompt_logprobs))
            outputs.append(StepOutput(request.request_id, token, request.finish_reason, lp, prompt))
            if request.finish_reason is not None and not request.keep_on_finish:
                self._release(request)
        self.running = [r for r in self.running if r.finish_reason is None]
        return outputs

    def _release(self, request: Request) -> None:
        if request.slot is not None:
            self.pools.slots.free([request.slot])
            request.slot = None
        if request.pages:
            self.pools.pages.free(request.pages)
            request.pages = []

    def run_to_completion(self) -> None:
        while self.has_work:
            if not self.step() and not self.running and self.waiting:
                raise OutOfCapacity("waiting requests cannot be admitted into empty pools")
