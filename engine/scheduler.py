"""The single-process scheduler: waiting queue, chunked prefill under a token budget, continuous-batching
decode, stop conditions, finish and free. Admission is engine/admission.py's, page growth and retraction
engine/page_growth.py's, the prefix cache's restore and snapshots engine/prefix_restore.py's.

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
deepest boundary snapshot on its path in the cache's radix tree and prefills only the rest; each forward also
snapshots the page boundaries its prefill chunks cross (engine/prefix_restore.py), without cutting a chunk.

With overlap, step N+1's forward and draw are queued before step N's tokens are read. A request with a
grammar needs token N accepted by its matcher before step N+1's mask can be built (engine/grammar.py), so
when the step samples such a request the order becomes: launch forward N+1 → read and postprocess step N →
build the masks → draw N+1 and start its copy. The forward still hides the host work of step N; only the
draw waits. Without a grammar in the step nothing changes (no extra sync).

`step(lock)`: a caller that holds `lock` over the step (the decode worker's engine lock, which its control threads
take to reserve and release) has it let go of where the step only computes (`Released`): while the forward runs
and while the host waits for the step's tokens. Everything the lock guards — the waiting and running lists, the
slot and page allocators, the prefix cache's tree and store — is changed only with the lock held, and never left
half-changed across a release: admission, page growth and the schedule are done before the forward, the
snapshots it captured are committed and its requests' counts moved after it. What the forward and the wait touch
belongs to the step alone: the scheduled requests (which another thread never touches: aborts reach the worker's
loop thread) and their pages and slots, the scratch rows, the runner's buffers and graphs.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

import torch

from sparsepd.engine.admission import Admission
from sparsepd.engine.draw import InFlightStep, draw, plain_draw
from sparsepd.engine.grammar import token_bitmask
from sparsepd.engine.host_memory import HostMemory
from sparsepd.engine.page_growth import PageGrowth
from sparsepd.engine.pools import OutOfCapacity
from sparsepd.engine.prefix_cache import PrefixCache
from sparsepd.engine.prefix_restore import PrefixRestore
from sparsepd.engine.prompt_logprobs import plan_rows, score_rows
from sparsepd.engine.request import PENDING, PromptLogprobs, Request, StepOutput
from sparsepd.engine.runner import Runner, to_device
from sparsepd.engine.sampling import finish_reason
from sparsepd.engine.state_io import copy_state
from sparsepd.gpu_wait import GpuWait


@dataclass
class LaunchedForward:
    """A step's forward, queued on the device, not yet drawn from: its logits and the requests that sample."""

    scheduled: list
    logits: torch.Tensor | None  # [len(sampled), V] fp32, None when no request samples
    sampled: list
    prompt: tuple | None = None  # (PromptRows, HostScores): prompt log-probabilities scored in this step

    @property
    def has_grammar(self) -> bool:
        return any([r.grammar is not None for r in self.sampled])  # (a list: no generator resumed per row)


class Released:
    """`with released:` lets go of `lock` (held by this thread) for the block and takes it back after, also when the
    block raises; nothing when `lock` is None. One object per scheduler, its lock set per step: two calls a use."""

    __slots__ = ("lock",)

    def __init__(self) -> None:
        self.lock: threading.Lock | None = None

    def __enter__(self) -> None:
        if self.lock is not None:
            self.lock.release()

    def __exit__(self, *exc: object) -> None:
        if self.lock is not None:
            self.lock.acquire()


class Scheduler:
    def __init__(self, runner: Runner, max_batch_tokens: int | None = None, overlap: bool = False,
                 cache: PrefixCache | None = None, host: HostMemory | None = None, gpu_wait: GpuWait = "spin"):
        """host: the host memory retracted states share with the prefix cache's host tier (None: unbounded).
        gpu_wait: how the host waits for a step's tokens on a CUDA device (engine/draw.py `host_event`)."""
        self.runner, self.pools, self.cache = runner, runner.pools, cache
        self.max_batch_tokens = max_batch_tokens or runner.pools.geometry.max_batch_tokens
        if self.max_batch_tokens > runner.pools.geometry.max_batch_tokens:
            raise ValueError(f"max_batch_tokens={self.max_batch_tokens} exceeds the pools' scratch rows "
                             f"{runner.pools.geometry.max_batch_tokens}")
        self.prefix = PrefixRestore(self.pools, cache) if cache is not None else None
        self.admission = Admission(self.pools, cache, self.prefix, host)
        self.growth = PageGrowth(self.pools, cache, self.admission, self.admission.host)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.overlap, self.gpu_wait = overlap, gpu_wait
        self._in_flight: InFlightStep | None = None  # launched, not yet read (overlap only)
        self.released = Released()  # the caller's lock let go of while the device computes (module docstring)

    @property
    def retractions(self) -> int:
        """Requests moved back to waiting (state to host memory) for want of a page."""
        return self.growth.retractions

    # --- receive ---------------------------------------------------------------------------------
    def add(self, request: Request) -> None:
        """Queue a request; raise OutOfCapacity if it could never fit, ValueError if it is malformed."""
        self.admission.check(request, self.runner.model.cfg.max_seq_len)
        self.waiting.append(request)

    def abort(self, request_id: str) -> bool:
        """End a request wherever it is and free what it holds; False if unknown or already finished."""
        for r in list(self.waiting):
            if r.request_id == request_id:
                self.waiting.remove(r)
                self.admission.forget_offloaded(r)
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
    def step(self, lock: threading.Lock | None = None) -> list[StepOutput]:
        """One step. With overlap, this step's forward and sampling are launched before the previous step's
        results are read (they are usually ready by then), so the host work of a step hides behind the GPU;
        the outputs returned are the previous step's. lock: held by the caller, let go of during the forward and
        the wait for the tokens (module docstring)."""
        self.released.lock = lock
        self.admission.admit_waiting(self.waiting, self.running)
        read_early = self.growth.grow(self.running, self.waiting, self._read_in_flight)  # to make room (overlap)
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

    def _read_in_flight(self) -> list[StepOutput] | None:
        """Read the step in flight now (its outputs; None when there is none)."""
        if self._in_flight is None:
            return None
        step, self._in_flight = self._in_flight, None
        return self._postprocess(step)

    # --- what the workers call (engine/admission.py, engine/page_growth.py, engine/prefix_restore.py) ---------
    def initial_pages(self, request: Request) -> int:
        return self.admission.initial_pages(request)

    def headroom(self) -> int:
        return self.admission.headroom(self.running)

    def ensure_pages(self, request: Request, num_tokens: int) -> None:
        self.growth.ensure_pages(request, num_tokens)

    def admit(self, request: Request) -> None:
        self.admission.admit(request, self.running)

    def reserve(self, request: Request, headroom: int = 0, lookup: bool = True) -> None:
        self.admission.reserve(request, headroom, lookup)

    def restore_prefix(self, request: Request) -> int:
        """A reserved request whose prompt is known now: its longest cached prefix restored; the tokens restored."""
        return self.prefix.restore_reserved(request) if self.prefix is not None else 0

    def activate(self, request: Request) -> None:
        """Run a reserved request whose state has been imported (the decode worker's admission)."""
        self.running.append(request)

    def release(self, request: Request) -> None:
        """Free a request's slot and pages (a reservation that never ran, or any request)."""
        self.admission.release(request)

    def _schedule(self) -> list[tuple[Request, list[int]]]:
        """Every decoding request one token (PENDING when it is the one still being sampled on the GPU), then
        prefill chunks (oldest first) with the rest of the budget. A request whose next token is its last
        (max_new_tokens, counting the one in flight) is not scheduled: it finishes when that one is read."""
        budget = self.max_batch_tokens
        out, prefilling, pending = [], [], [PENDING]
        for r in self.running:  # one pass: `prefilling` asked once a request
            if r.prefilling:
                prefilling.append(r)
            elif budget and r.finish_reason is None and len(r.output_ids) + r.num_pending < r.params.max_new_tokens:
                # (the one-token list is shared: nothing downstream mutates a step's token lists)
                out.append((r, pending if r.num_pending else r.next_tokens(1)))
                budget -= 1
        for r in prefilling:
            if budget <= 0:
                break
            tokens = r.next_tokens(budget)  # (the prefix cache's snapshots need no cut: prefix_restore.py)
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
        capturing = self.prefix.plan(scheduled) if self.prefix is not None else []
        try:
            with self.released:  # the scheduled requests' rows only: the caller's lock is free meanwhile
                if prompt_rows is None:
                    logits = self.runner.forward(scheduled)
                else:
                    logits, hidden = self.runner.forward(scheduled, final_rows=prompt_rows.rows)
                    prompt = (prompt_rows, score_rows(self.runner.model, hidden, prompt_rows).to_host(self.gpu_wait))
        except BaseException:
            if capturing:
                self.prefix.cancel(capturing)
            raise
        if capturing:
            self.prefix.commit(capturing)
        rows, sampling = [], []
        i = 0
        for request, tokens in scheduled:
            n = request.num_computed = request.num_computed + len(tokens)
            if request.cache_at is not None and n >= request.cache_at:
                request.cache_at = request.cache_hashes = None  # its last boundary is snapshotted
            if n >= len(request.prompt_ids) + len(request.output_ids) + request.num_pending:  # all known computed
                rows.append(i)
                sampling.append(request)
            i += 1
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
        if all_plain(sampling):
            drawn = plain_draw(logits)
        else:
            table = [(r.params, r.sampler, len(r.output_ids) + r.num_pending, eos) for r in sampling]
            mask = token_bitmask([r.grammar for r in sampling], logits.shape[1], device)
            drawn = draw(logits, table, device, mask)
            for row, why in drawn.failed.items():  # fails that request alone, in _postprocess
                sampling[row].error = f"request {sampling[row].request_id}: {why}"
        slots = [r.slot for r in sampling]
        if None in slots:  # stateless forks have no slot
            kept = [i for i, s in enumerate(slots) if s is not None]
            slots, tokens = [slots[i] for i in kept], drawn.tokens[to_device(kept, logits.device)]
        else:
            tokens = drawn.tokens
        self.runner.remember_tokens(slots, tokens)
        for r in sampling:
            r.num_pending += 1
        return InFlightStep(forward.scheduled, sampling, drawn.to_host(self.gpu_wait), forward.prompt)

    def _postprocess(self, step: InFlightStep) -> list[StepOutput]:
        if step.prompt is not None:  # before the tokens: a final chunk's values precede its first token
            rows, host = step.prompt
            host.deliver(rows)
        if not step.sampled:
            return []
        outputs = []
        with self.released:
            tokens, logprobs = step.host.result()  # waits for this step's copy (one sync a step)
        eos = self.runner.model.cfg.eos_id
        for i, request in enumerate(step.sampled):
            request.num_pending -= 1
            if request.finish_reason is not None or (request.slot is None and not request.stateless):
                continue  # finished or aborted while this step ran: its token is dropped
            if request.error:
                request.finish_reason = "error"
                outputs.append(StepOutput(request.request_id, -1, "error", error=request.error))
                self._release(request)
                continue
            self._emit(request, tokens[i], logprobs[i] if logprobs is not None else None, outputs, eos)
        self.running[:] = [r for r in self.running if r.finish_reason is None]  # in place: page growth holds it
        return outputs

    def _emit(self, request: Request, token: int, lp, outputs: list[StepOutput], eos: int | None = None) -> None:
        """Deliver one drawn token of a live request: its grammar, output, log-probabilities, finish and release
        (eos: the model's, looked up once a step by the caller)."""
        params = request.params
        request.sampler.num_drawn += 1  # (Sampler.advance, inlined: a call per request-step)
        if request.grammar is not None and not request.grammar.accept(token):
            request.finish_reason = "error"  # a masked token was drawn: a bug, this request's alone
            request.error = (f"internal error: token {token} was drawn at output position "
                             f"{len(request.output_ids)} but the request's grammar does not allow it")
            outputs.append(StepOutput(request.request_id, token, "error", error=request.error))
            self._release(request)
            return
        output_ids = request.output_ids
        output_ids.append(token)
        n = len(output_ids)
        if lp is not None:
            request.output_logprobs.append(lp)
        request.finish_reason = finish_reason(token, n, params, self.runner.model.cfg.eos_id if eos is None else eos)
        if request.grammar is not None and request.grammar.terminated:
            request.finish_reason = "stop"  # the grammar accepted its stop token (even with ignore_eos)
        prompt = None
        if n == 1 and params.logprob_start_len is not None:
            prompt = PromptLogprobs(params.logprob_start_len, tuple(request.prompt_logprobs))
        if request.finish_reason is not None and request.spec_drafted:
            outputs.append(StepOutput(request.request_id, token, request.finish_reason, lp, prompt,
                                      spec_drafted=request.spec_drafted, spec_accepted=request.spec_accepted))
        else:
            outputs.append(StepOutput(request.request_id, token, request.finish_reason, lp, prompt))
        if request.finish_reason is not None and not request.keep_on_finish:
            self._release(request)

    def _release(self, request: Request) -> None:
        self.admission.release(request)

    def run_to_completion(self) -> None:
        while self.has_work:
            if not self.step() and not self.running and self.waiting:
                raise OutOfCapacity("waiting requests cannot be admitted into empty pools")


def all_plain(requests: list[Request]) -> bool:
    """Whether every request's draw this step is a plain argmax (`Request.plain_draw_from`, asked once a request)."""
    for r in requests:
        start = r.plain_from
        if start is None:
            start = r.plain_from = r.plain_draw_from()
        if start and (start < 0 or len(r.output_ids) + r.num_pending < start):
            return False
    return True
