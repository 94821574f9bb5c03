"""The engine: one process's model, pools, runner, scheduler and prefix cache, behind one interface.

`Engine.generate(prompts, params)` runs requests to completion with continuous batching and chunked
prefill; `submit`/`step`/`abort` drive it incrementally. The workers drive it through the methods below and
nothing else of it (docs/DESIGN.md §8): the prefill worker makes requests, `add`s them, steps until each has
its first token and `export_state`s it; the decode worker `reserve`s a slot and pages for a request whose state
comes later, `import_state`s it into them (or, colocated, `restore_prefix` and prefills it here) and
`activate`s it; either `abort`s or `release`s a request, and reports `load()`.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from sparsepd.engine.drafter import Drafter, MTPDrafter
from sparsepd.engine.grammar import GrammarMatch
from sparsepd.engine.host_memory import HostMemory
from sparsepd.engine.memory_plan import memory_plan
from sparsepd.engine.pools import KVPools, PoolConfig, plan_geometry
from sparsepd.engine.prefix_cache import PrefixCache
from sparsepd.engine.request import Request, StepOutput
from sparsepd.engine.runner import Runner
from sparsepd.engine.sampling import Sampler, SamplingParams
from sparsepd.engine.scheduler import Scheduler
from sparsepd.engine.speculative import SpeculativeScheduler, SpeculativeStats
from sparsepd.engine.state_io import (
    StateDescriptor,
    TensorSpec,
    expected_specs,
    export_state,
    fork_descriptor,
    import_state,
)
from sparsepd.gpu_wait import GpuWait
from sparsepd.grammar import Grammar, Grammars, Vocabulary
from sparsepd.model.mtp import MTPBlock
from sparsepd.model.transformer import Transformer
from sparsepd.model_config import ModelConfig


@dataclass(frozen=True)
class EngineLoad:
    """What an engine holds now (a worker's Stats)."""

    num_pages: int
    free_pages: int  # free, and those only prefix-cache entries hold (given up on demand)
    num_slots: int
    free_slots: int
    running: int  # requests in the running batch
    waiting: int  # requests queued: not admitted yet, or retracted to host memory and waiting for room
    retractions: int  # requests moved back to waiting for want of a page, since start
    speculative: SpeculativeStats | None = None  # drafted and accepted tokens (speculative decoding on)
    forwards: dict[str, int] = field(default_factory=dict)  # forwards since start by path (engine/runner.py)


class Engine:
    def __init__(self, model: Transformer, pool_config: PoolConfig | None = None, cuda_graph: bool = False,
                 overlap: bool = False, vocabulary: Vocabulary | None = None, max_retracted_bytes: int | None = None,
                 speculative_num_steps: int = 0, mtp: MTPBlock | None = None, drafter: Drafter | None = None,
                 graph_capture: bool = True, gpu_wait: GpuWait = "spin", prefill_graph: bool = False):
        """cuda_graph: replay captured CUDA graphs for decode steps (a CUDA device only; engine/graphs.py), and with
        speculative decoding for its verification and MTP drafts (engine/spec_graphs.py). graph_capture=False
        runs speculative decoding's fixed-shape steps eagerly instead of capturing them, on any device (the CPU
        tests of the graph path).
        prefill_graph: forwards of a few prompt chunks (alone, or beside a decode step's replay) replay CUDA graphs
        too (engine/prefill_graphs.py; with graph_capture=False the same fixed-shape steps run eagerly, any device).
        overlap: launch each step before reading the previous step's tokens (engine/scheduler.py).
        gpu_wait: how the host waits for each step's tokens on a CUDA device: "spin" (CUDA's default event) or
        "block" (a blocking-sync event: the thread sleeps); engine/draw.py `host_event`.
        vocabulary: what grammars compile against (default: the byte vocabulary of the model's config).
        max_retracted_bytes: host memory the states of retracted requests may take before the newest decoding
        request fails instead of being retracted (engine/page_growth.py; default: the KV pool's own size, or with a
        prefix-cache host tier all of its bytes, which retracted states share: engine/host_memory.py).
        speculative_num_steps: k > 0 drafts k tokens per decoding request and verifies them in one forward
        (engine/speculative.py; steps without overlap), drafted by `drafter` or else by the checkpoint's MTP layer
        `mtp` (engine/drafter.py).
        A prefix cache (engine/prefix_cache.py) when pool_config.prefix_cache_entries > 0."""
        pool_config = pool_config or PoolConfig(num_pages=256)
        self.model = model
        self.pools = KVPools(model.cfg, plan_geometry(model.cfg, pool_config, model.device), model.device)
        on_cuda = self.pools.device.type == "cuda"
        static = bool(speculative_num_steps) and cuda_graph and (on_cuda or not graph_capture)
        capture = graph_capture and on_cuda
        # (a speculative step always verifies: the one-token decode graphs would never replay)
        self.runner = Runner(model, self.pools, cuda_graph=cuda_graph and on_cuda and not speculative_num_steps)
        if static:
            self.runner.use_verify_graphs(speculative_num_steps, capture)
        if prefill_graph and (on_cuda or not graph_capture):
            self.runner.use_prefill_graphs(capture)
        entries = pool_config.prefix_cache_entries
        host_tier = pool_config.prefix_cache_host_bytes if entries else 0
        self.host_memory = HostMemory.for_engine(host_tier, max_retracted_bytes, self.pools.num_bytes())
        host = self.host_memory if host_tier else None
        self.prefix_cache = PrefixCache(self.pools, entries, host) if entries else None
        if speculative_num_steps:
            if drafter is None and mtp is None:
                raise ValueError(f"speculative_num_steps={speculative_num_steps} needs the checkpoint's MTP layer "
                                 "(mtp.0.*) or a drafter")
            drafter = drafter or MTPDrafter(model, mtp, self.pools, self.runner.rope_tables, graphs=static,
                                            capture=capture)
            self.scheduler = SpeculativeScheduler(self.runner, drafter, speculative_num_steps, cache=self.prefix_cache,
                                                  host=self.host_memory, gpu_wait=gpu_wait)
        else:
            self.scheduler = Scheduler(self.runner, overlap=overlap, cache=self.prefix_cache, host=self.host_memory,
                                       gpu_wait=gpu_wait)
        self._ids = itertools.count()
        vocabulary = vocabulary or byte_vocabulary(model)
        if (vocabulary.vocab_size, vocabulary.eos_id) != (model.cfg.vocab_size, model.cfg.eos_id):
            raise ValueError(f"the grammar vocabulary has vocab_size={vocabulary.vocab_size}, eos_id="
                             f"{vocabulary.eos_id}; the model {model.cfg.vocab_size}, {model.cfg.eos_id}")
        self.grammars = Grammars(vocabulary)

    def capture_graphs(self, max_context: int) -> None:
        """Capture the decode graphs (or speculative decoding's verification and draft graphs) for contexts up to
        max_context tokens now (no-op without graphs)."""
        self.runner.capture_graphs(max_context)
        drafter = getattr(self.scheduler, "drafter", None)
        if isinstance(drafter, MTPDrafter):
            drafter.capture_graphs(self.scheduler.num_steps)
        self._ids = itertools.count()

    def make_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None,
                     output_ids: Sequence[int] = ()) -> Request:
        """A request for the scheduler (not queued); ValueError for a bad token id, stop id or grammar (the
        compiler's message). output_ids: tokens it already generated elsewhere (a request resumed after its
        worker was lost): its prefill covers prompt + those, and its next token is drawn as token
        len(output_ids) of its random stream, with them in its penalty history, its length limits and its
        grammar's state."""
        vocab = self.model.cfg.vocab_size
        if any(not 0 <= t < vocab for t in prompt_ids) or any(not 0 <= t < vocab for t in output_ids):
            raise ValueError(f"prompt and output token ids must lie in [0, {vocab})")
        if len(output_ids) >= params.max_new_tokens:
            raise ValueError(f"{len(output_ids)} tokens already generated: nothing left to generate with "
                             f"max_new_tokens={params.max_new_tokens}")
        if params.logprob_start_len is not None and params.logprob_start_len >= len(prompt_ids):
            raise ValueError(f"logprob_start_len={params.logprob_start_len} must be < the prompt's "
                             f"{len(prompt_ids)} tokens")
        request = Request(request_id or f"req-{next(self._ids)}", list(prompt_ids), params, Sampler(params, vocab),
                          output_ids=list(output_ids))
        request.sampler.advance(len(output_ids))
        if params.grammar is not None:
            request.grammar = GrammarMatch(self.grammars.compile(params.grammar))
            request.grammar.replay(output_ids)
        return request

    def submit(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None,
               forks: Sequence[SamplingParams] = ()) -> Request:
        """Queue a prompt; `forks` (n > 1): more sequences from the same prefill, one per params (own seed),
        in `request.forks` until the first token is drawn, then running on their own."""
        request = self.make_request(prompt_ids, params, request_id)
        request.forks = [self.make_request(prompt_ids, p, f"{request.request_id}/{i + 1}") for i, p in enumerate(forks)]
        self.scheduler.add(request)
        return request

    def step(self, lock: threading.Lock | None = None) -> list[StepOutput]:
        """One step of every running request. lock: one the caller holds over the step and takes for every other
        call into this engine (the decode worker's): let go of while the forward runs and while the host waits for
        the step's tokens, so those calls need not wait for the device; the scheduler's lists, the allocators and
        the prefix cache are changed only while it is held (engine/scheduler.py)."""
        return self.scheduler.step(lock)

    def abort(self, request_id: str) -> bool:
        """End a request wherever it is and free what it holds; False if unknown or already finished."""
        return self.scheduler.abort(request_id)

    # --- what the workers drive -------------------------------------------------------------------
    @property
    def cfg(self) -> ModelConfig:
        """The model's configuration."""
        return self.model.cfg

    def compile_grammar(self, grammar: Grammar) -> None:
        """Compile a request's grammar now (cached: `make_request` finds it); ValueError with the compiler's
        message when it does not compile."""
        self.grammars.compile(grammar)

    def add(self, request: Request) -> None:
        """Queue a request from `make_request` (with its forks); OutOfCapacity if it could never fit, ValueError
        if it is malformed."""
        self.scheduler.add(request)

    def reserve(self, request: Request) -> None:
        """A slot and the pages of a request's known tokens and next one, without running it and without a prefix
        lookup (its prompt or state comes later): OutOfCapacity, also when that would leave fewer free pages than
        the running requests' growth needs (one each, `Scheduler.headroom`)."""
        self.scheduler.reserve(request, headroom=self.scheduler.headroom(), lookup=False)

    def ensure_pages(self, request: Request, num_tokens: int) -> None:
        """Pages for a reserved request's first num_tokens positions (OutOfCapacity, holding what it held)."""
        self.scheduler.ensure_pages(request, num_tokens)

    def restore_prefix(self, request: Request) -> int:
        """A reserved request whose prompt is known now: its longest cached prefix restored into its slot and
        pages (with a prefix cache); the prompt tokens restored."""
        return self.scheduler.restore_prefix(request)

    def activate(self, request: Request) -> None:
        """Run a reserved request: its state imported (`import_state`), or its prompt set to prefill here."""
        self.scheduler.activate(request)

    def release(self, request: Request) -> None:
        """Free a request's slot and pages: a reservation that never ran, or a request kept after its finish."""
        self.scheduler.release(request)

    def export_state(self, request: Request) -> tuple[StateDescriptor, dict[str, torch.Tensor]]:
        """A request's state copied to host memory (engine/state_io.py)."""
        return export_state(self.pools, request)

    def fork_descriptor(self, descriptor: StateDescriptor, fork: Request) -> StateDescriptor:
        """The descriptor of a fork's state: its source's exported one with the fork's own tokens and sampler."""
        return fork_descriptor(self.pools, descriptor, fork)

    def state_specs(self, num_pages: int) -> tuple[TensorSpec, ...]:
        """The tensors a shipped state of num_pages pages holds (what a receiver checks a transfer against)."""
        return expected_specs(self.pools, num_pages)

    def import_state(self, request: Request, descriptor: StateDescriptor, tensors: dict[str, torch.Tensor]) -> None:
        """A shipped state into a reserved request's slot and pages (ValueError when it does not fit them)."""
        import_state(self.pools, request, descriptor, tensors)

    @property
    def has_work(self) -> bool:
        """Whether a request is running, or queued (retracted ones included)."""
        return self.scheduler.has_work

    @property
    def free_slots(self) -> int:
        """Slots free now: one integer read, which another thread may make without the worker's lock (a hint there:
        a slot may be freed or taken the next moment)."""
        return self.pools.slots.num_free

    @property
    def has_running(self) -> bool:
        return bool(self.scheduler.running)

    def requests(self) -> list[Request]:
        """The requests admitted here: running, then queued (retracted ones in host memory included)."""
        return [*self.scheduler.running, *self.scheduler.waiting]

    def pages_for(self, num_tokens: int) -> int:
        """Pages that num_tokens positions take."""
        return self.pools.pages_for(num_tokens)

    def load(self) -> EngineLoad:
        pages, slots, cache = self.pools.pages, self.pools.slots, self.prefix_cache
        reclaimable = cache.reclaimable_pages() if cache is not None else 0
        return EngineLoad(num_pages=pages.capacity, free_pages=pages.num_free + reclaimable,
                          num_slots=slots.capacity, free_slots=slots.num_free, running=len(self.scheduler.running),
                          waiting=len(self.scheduler.waiting), retractions=self.scheduler.retractions,
                          speculative=getattr(self.scheduler, "stats", None), forwards=dict(self.runner.forwards))

    def memory_plan(self) -> str:
        """Where the device memory goes: weights, pages, slots, scratch (engine/memory_plan.py)."""
        drafter = getattr(self.scheduler, "drafter", None)
        undo = getattr(self.scheduler, "_undo_graphs", None)
        undo_bytes = undo.planned_bytes() if undo is not None else 0
        if isinstance(drafter, MTPDrafter):
            return memory_plan(self.model, self.pools, drafter.mtp, drafter.pools, undo_bytes)
        return memory_plan(self.model, self.pools, undo_bytes=undo_bytes)

    def holds_nothing(self) -> bool:
        """No page and no slot is held, by a request or by the prefix cache."""
        return self.pools.pages.num_used == 0 and self.pools.slots.num_used == 0

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[Request]:
        """Run every prompt to completion; requests come back in prompt order."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        requests = [self.submit(p, sp) for p, sp in zip(prompts, plist, strict=True)]
        self.scheduler.run_to_completion()
        return requests

    def is_idle_and_empty(self) -> bool:
        """No request holds anything: every slot is free, and every page too but those only the prefix cache
        holds."""
        held = self.prefix_cache.held_pages() if self.prefix_cache is not None else {}
        pages = self.pools.pages
        return (not self.scheduler.has_work and self.pools.slots.num_used == 0 and pages.num_used == len(held)
                and all(pages.refs(page) == n for page, n in held.items()))


def byte_vocabulary(model: Transformer) -> Vocabulary:
    """The byte vocabulary of a model without a tokenizer.json (model/tokenizer.py's ByteTokenizer)."""
    return Vocabulary(vocab_size=model.cfg.vocab_size, eos_id=model.cfg.eos_id)
