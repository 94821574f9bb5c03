"""The colocated engine: one process holding the model, the pools, the runner and the scheduler.

`Engine.generate(prompts, params)` runs requests to completion with continuous batching and chunked
prefill; `submit`/`step`/`abort` drive it incrementally. The prefill and decode workers use the same parts
(pools, runner, scheduler, state export/import) split across two processes.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

from sparsepd.engine.grammar import GrammarMatch
from sparsepd.engine.pools import KVPools, PoolConfig, plan_geometry
from sparsepd.engine.prefix_cache import PrefixCache
from sparsepd.engine.request import Request, StepOutput
from sparsepd.engine.runner import Runner
from sparsepd.engine.sampling import Sampler, SamplingParams
from sparsepd.engine.scheduler import Scheduler
from sparsepd.grammar import Grammars, Vocabulary
from sparsepd.model.transformer import Transformer


class Engine:
    def __init__(self, model: Transformer, pool_config: PoolConfig | None = None, cuda_graph: bool = False,
                 overlap: bool = False, vocabulary: Vocabulary | None = None, max_retracted_bytes: int | None = None):
        """cuda_graph: replay captured CUDA graphs for decode steps (a CUDA device only; engine/graphs.py).
        overlap: launch each step before reading the previous step's tokens (engine/scheduler.py).
        vocabulary: what grammars compile against (default: the byte vocabulary of the model's config).
        max_retracted_bytes: host memory the states of retracted requests may take before the newest decoding
        request fails instead of being retracted (engine/scheduler.py; default: the KV pool's own size).
        A prefix cache (engine/prefix_cache.py) when pool_config.prefix_cache_entries > 0."""
        pool_config = pool_config or PoolConfig(num_pages=256)
        self.model = model
        self.pools = KVPools(model.cfg, plan_geometry(model.cfg, pool_config, model.device), model.device)
        self.runner = Runner(model, self.pools, cuda_graph=cuda_graph and self.pools.device.type == "cuda")
        entries = pool_config.prefix_cache_entries
        self.prefix_cache = PrefixCache(self.pools, entries, pool_config.prefix_cache_host_bytes) if entries else None
        bound = self.pools.num_bytes() if max_retracted_bytes is None else max_retracted_bytes
        self.scheduler = Scheduler(self.runner, overlap=overlap, cache=self.prefix_cache, max_retracted_bytes=bound)
        self._ids = itertools.count()
        vocabulary = vocabulary or byte_vocabulary(model)
        if (vocabulary.vocab_size, vocabulary.eos_id) != (model.cfg.vocab_size, model.cfg.eos_id):
            raise ValueError(f"the grammar vocabulary has vocab_size={vocabulary.vocab_size}, eos_id="
                             f"{vocabulary.eos_id}; the model {model.cfg.vocab_size}, {model.cfg.eos_id}")
        self.grammars = Grammars(vocabulary)

    def capture_graphs(self, max_context: int) -> None:
        """Capture the decode graphs for contexts up to max_context tokens now (no-op without graphs)."""
        self.runner.capture_graphs(max_context)
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

    def step(self) -> list[StepOutput]:
        return self.scheduler.step()

    def abort(self, request_id: str) -> bool:
        return self.scheduler.abort(request_id)

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
