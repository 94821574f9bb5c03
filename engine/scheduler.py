"""The single-process scheduler: waiting queue, admission by free pages and slots, chunked prefill under a
token budget, continuous-batching decode, stop conditions, finish and free.

One `step()` is receive → schedule → run → postprocess, as in nano-vllm: admit what fits, give every
decoding request one token and the rest of the budget to prefill chunks (oldest first), run one forward,
sample the requests whose known tokens are all computed, and free the finished ones. This is also the
colocated serving mode that the disaggregated service is compared against.
"""

from __future__ import annotations

from collections import deque

from sparsepd.engine.draw import InFlightStep, draw
from sparsepd.engine.pools import OutOfCapacity
from sparsepd.engine.request import PENDING, Request, StepOutput
from sparsepd.engine.runner import Runner, to_device
from sparsepd.engine.sampling import finish_reason


class Scheduler:
    def __init__(self, runner: Runner, max_batch_tokens: int | None = None, overlap: bool = False):
        self.runner, self.pools = runner, runner.pools
        self.max_batch_tokens = max_batch_tokens or runner.pools.geometry.max_batch_tokens
        if self.max_batch_tokens > runner.pools.geometry.max_batch_tokens:
            raise ValueError(f"max_batch_tokens={self.max_batch_tokens} exceeds the pools' scratch rows "
                             f"{runner.pools.geometry.max_batch_tokens}")
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.overlap = overlap
        self._in_flight: InFlightStep | None = None  # launched, not yet read (overlap only)

    # --- receive ---------------------------------------------------------------------------------
    def add(self, request: Request) -> None:
        """Queue a request; raise OutOfCapacity if it could never fit, ValueError if it is malformed."""
        cfg = self.runner.model.cfg
        if not request.prompt_ids:
            raise ValueError(f"request {request.request_id}: empty prompt")
        if request.max_len > cfg.max_seq_len:
            raise ValueError(f"request {request.request_id}: prompt {len(request.prompt_ids)} + max_new_tokens "
                             f"{request.params.max_new_tokens} exceeds max_seq_len={cfg.max_seq_len}")
        if self.pools.pages_for(request.max_len) > self.pools.pages.capacity:
            raise OutOfCapacity(f"request {request.request_id} needs {self.pools.pages_for(request.max_len)} pages, "
                                f"the pool has {self.pools.pages.capacity}")
        self.waiting.append(request)

    def abort(self, request_id: str) -> bool:
        """End a request wherever it is and free what it holds; False if unknown or already finished."""
        for r in list(self.waiting):
            if r.request_id == request_id:
                self.waiting.remove(r)
                return True
        for r in self.running:
            if r.request_id == request_id:
                self._release(r)
                self.running.remove(r)
                return True
        return False

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # --- schedule, run, postprocess ---------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        """One step. With overlap, this step's forward and sampling are launched before the previous step's
        results are read (they are usually ready by then), so the host work of a step hides behind the GPU;
        the outputs returned are the previous step's."""
        self._admit()
        scheduled = self._schedule()
        launched = self._launch(scheduled) if scheduled else None
        if not self.overlap:
            return self._postprocess(launched) if launched is not None else []
        previous, self._in_flight = self._in_flight, launched
        return self._postprocess(previous) if previous is not None else []

    def _admit(self) -> None:
        while self.waiting:
            request = self.waiting[0]
            pages = self.pools.pages_for(request.max_len)
            if not (self.pools.slots.can_allocate(1) and self.pools.pages.can_allocate(pages)):
                return
            self.waiting.popleft()
            self.admit(request)

    def admit(self, request: Request) -> None:
        """Give a request a slot and pages for all its tokens and make it run (raises OutOfCapacity)."""
        self.reserve(request)
        self.running.append(request)

    def reserve(self, request: Request) -> None:
        """A slot and pages for all of a request's tokens, without running it (raises OutOfCapacity)."""
        slot = self.pools.slots.allocate(1)[0]
        try:
            request.pages = self.pools.pages.allocate(self.pools.pages_for(request.max_len))
        except OutOfCapacity:
            self.pools.slots.free([slot])
            raise
        request.slot = slot
        self.pools.reset_slot(slot)

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
                tokens = r.next_tokens(budget)
                out.append((r, tokens))
                budget -= len(tokens)
        return out

    def _launch(self, scheduled: list[tuple[Request, list[int]]]) -> InFlightStep:
        """Run the forward and sample on the device; start the copy of the sampled tokens to the host."""
        logits = self.runner.forward(scheduled)
        rows, sampling = [], []
        for i, (request, tokens) in enumerate(scheduled):
            request.num_computed += len(tokens)
            if request.num_computed >= request.num_known + request.num_pending:
                rows.append(i)
                sampling.append(request)
        if not sampling:
            return InFlightStep(scheduled, [], None)
        if len(rows) < logits.shape[0]:
            logits = logits[to_device(rows, logits.device)]
        eos = self.runner.model.cfg.eos_id
        table = [(r.params, r.sampler, len(r.output_ids) + r.num_pending, eos) for r in sampling]
        drawn = draw(logits, table, self.runner.pools.device)
        for row, why in drawn.failed.items():  # fails that request alone, in _postprocess
            sampling[row].error = f"request {sampling[row].request_id}: {why}"
        self.runner.remember_tokens([r.slot for r in sampling], drawn.tokens)
        for r in sampling:
            r.num_pending += 1
        return InFlightStep(scheduled, sampling, drawn.to_host())

    def _postprocess(self, step: InFlightStep) -> list[StepOutput]:
        if not step.sampled:
            return []
        eos = self.runner.model.cfg.eos_id
        outputs = []
        tokens, logprobs = step.host.result()  # waits for this step's copy (one sync a step)
        for i, request in enumerate(step.sampled):
            request.num_pending -= 1
            if request.finish_reason is not None or request.slot is None:
                continue  # finished or aborted while this step ran: its token is dropped
            if request.error:
                request.finish_reason = "error"
                outputs.append(StepOutput(request.request_id, -1, "error", error=request.error))
                self._release(request)
                continue
            params, token = request.params, tokens[i]
            request.sampler.advance()
            request.output_ids.append(token)
            lp = logprobs[i] if logprobs is not None else None
            if lp is not None:
                request.output_logprobs.append(lp)
            request.finish_reason = finish_reason(token, len(request.output_ids), params, eos)
            outputs.append(StepOutput(request.request_id, token, request.finish_reason, lp))
            if request.finish_reason is not None:
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
