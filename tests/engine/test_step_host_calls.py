"""The per-step host work of the runner's decode path, counted rather than timed: finding the PENDING input tokens,
the graph path's fields, the penalties' bookkeeping of a step without a penalty and the remembering of a graph
step's tokens make no Python call per request or per token (the same number of calls at 8 requests as at 256), and
give what the per-request code gave."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from sparsepd.engine import runner as runner_module
from sparsepd.engine.batch import BatchShape, RequestChunk, check_chunks, decode_fields_into, host_fields
from sparsepd.engine.penalties import SlotHistory
from sparsepd.engine.pools import PoolConfig, plan_geometry
from sparsepd.engine.request import PENDING
from sparsepd.engine.runner import Runner
from sparsepd.model_config import get_preset
from sparsepd.sampling_params import SamplingParams

NUM_SLOTS = 300


def _count_calls(fn) -> int:
    """bench/bench_host.py's counter (sys.setprofile: Python and C calls), loaded the way test_host_cost.py does."""
    if "bench_host" not in sys.modules:
        path = Path(__file__).resolve().parents[2] / "bench" / "bench_host.py"
        spec = importlib.util.spec_from_file_location("bench_host", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules["bench_host"].count_calls(fn)


def _runner() -> Runner:
    """A Runner's step state on the CPU, without a model: what _fill_pending, _fill_from_fields and remember_tokens
    read."""
    runner = Runner.__new__(Runner)
    runner.pools = SimpleNamespace(device=torch.device("cpu"))
    runner.slot_tokens = torch.arange(NUM_SLOTS, dtype=torch.int64) * 7 + 3
    runner.history = SlotHistory(NUM_SLOTS, 64, "cpu")
    runner._graph_slots = None
    return runner


def _chunks(batch: int, gen: torch.Generator, prefill: int = 0) -> list[RequestChunk]:
    """`batch` one-token chunks (most PENDING, some known), then a prefill chunk of `prefill` known tokens."""
    slots = torch.randperm(NUM_SLOTS, generator=gen)[: batch + 1].tolist()
    chunks = [RequestChunk(slots[b], 100 + b, [PENDING if b % 5 else 11 + b], [b]) for b in range(batch)]
    if prefill:
        chunks.append(RequestChunk(slots[batch], 0, torch.randint(0, 64, (prefill,), generator=gen).tolist(), [0]))
    return chunks


def _reference_fill(runner: Runner, chunks: list[RequestChunk]) -> list[int]:
    return [int(runner.slot_tokens[c.slot]) if t == PENDING else t for c in chunks for t in c.token_ids]


@pytest.mark.parametrize("prefill", [0, 2048])
def test_pending_tokens_are_filled_with_no_call_per_request_or_token(prefill):
    gen = torch.Generator().manual_seed(3)
    runner, calls = _runner(), {}
    for batch in (8, 256):
        chunks = _chunks(batch, gen, prefill)
        token_ids = torch.tensor([t for c in chunks for t in c.token_ids], dtype=torch.int64)
        want = _reference_fill(runner, chunks)
        calls[batch] = _count_calls(lambda: runner._fill_pending(token_ids, chunks))  # noqa: B023
        assert token_ids.tolist() == want, (batch, prefill)
    assert calls[256] - calls[8] <= 2, calls


def test_graph_fill_and_remember_use_the_static_fields_slots():
    """The graph path fills PENDING tokens from the slots the static fields hold (padding untouched), and a step
    whose sampled slots are those remembers its tokens through them: no host index made (to_device not called)."""
    gen = torch.Generator().manual_seed(5)
    runner = _runner()
    chunks = _chunks(13, gen)
    padded = 16
    fields = {"token_ids": torch.tensor([c.token_ids[0] for c in chunks] + [0] * (padded - 13), dtype=torch.int64),
              "slots": torch.tensor([c.slot for c in chunks] + [0] * (padded - 13), dtype=torch.int64)}
    want = _reference_fill(runner, chunks) + [0] * (padded - 13)
    calls = {}
    for batch in (8, 256):
        other = _chunks(batch, gen)
        other_fields = {"token_ids": torch.tensor([c.token_ids[0] for c in other], dtype=torch.int64),
                        "slots": torch.tensor([c.slot for c in other], dtype=torch.int64)}
        calls[batch] = _count_calls(lambda: runner._fill_from_fields(other_fields, other))  # noqa: B023
    assert calls[256] - calls[8] <= 2, calls
    runner._fill_from_fields(fields, chunks)
    assert fields["token_ids"].tolist() == want
    slots = [c.slot for c in chunks]
    tokens = torch.arange(13, dtype=torch.int64) + 1000
    made = []
    real = runner_module.to_device
    runner_module.to_device = lambda values, device: made.append(values) or real(values, device)
    try:
        runner.remember_tokens(slots, tokens)
        assert made == []  # the static fields' slots, no host index
        assert runner.slot_tokens[slots].tolist() == tokens.tolist()
        runner.remember_tokens(slots[:12], tokens[:12] + 1)  # a request ended meanwhile: a host index
        assert made == [slots[:12]]
        assert runner.slot_tokens[slots[:12]].tolist() == (tokens[:12] + 1).tolist()
    finally:
        runner_module.to_device = real


def test_decode_fields_make_no_call_per_request():
    cfg = get_preset("bench")
    geometry = plan_geometry(cfg, PoolConfig(num_slots=NUM_SLOTS, max_batch_tokens=512, num_pages=2048),
                             torch.device("cpu"))
    gen = torch.Generator().manual_seed(7)
    calls = {}
    for batch in (8, 256):
        chunks = _chunks(batch, gen)
        chunks = [RequestChunk(c.slot, c.start + 37 * b, [5], list(range(b, b + 1 + (c.start + 37 * b) // 256)))
                  for b, c in enumerate(chunks)]
        shape = BatchShape(batch, pages=64)
        want = host_fields(chunks, geometry, shape)
        out = {k: np.full(tuple(v.shape), 12345, dtype=v.numpy().dtype) for k, v in want.items()}
        calls[batch] = _count_calls(lambda: decode_fields_into(chunks, geometry, shape, out))  # noqa: B023
        for name, t in want.items():
            assert np.array_equal(out[name], t.numpy()), (batch, name)
    assert calls[256] - calls[8] <= 2, calls


def test_a_step_without_penalties_costs_the_history_no_call_per_request():
    plain = SamplingParams(max_new_tokens=8)
    calls = {}
    for batch in (8, 256):
        runner = _runner()
        requests = [SimpleNamespace(params=plain, uses_history=False, slot=b) for b in range(batch)]
        slots = list(range(batch))
        tokens = torch.zeros(batch, dtype=torch.int64)
        history = runner.history
        calls[batch] = _count_calls(lambda: (history.bind(requests), history.record(slots, tokens)))  # noqa: B023
        assert runner.history.counts is None and not runner.history.active
    assert calls[256] == calls[8], calls


def test_an_out_of_vocabulary_token_is_named_with_its_request():
    """check_chunks refuses a step with a token outside the vocabulary before any forward, naming the token, its
    position in the chunk and the chunk's slot (not only the step's range)."""
    cfg = get_preset("tiny")
    geometry = plan_geometry(cfg, PoolConfig(num_slots=4, max_batch_tokens=64, num_pages=8), torch.device("cpu"))
    good = RequestChunk(0, 0, [1, 2, 3], [0])
    bad = RequestChunk(2, 5, [4, cfg.vocab_size + 7, 5], [1])
    check_chunks([good, RequestChunk(1, 3, [PENDING], [2])], geometry, cfg.vocab_size)  # PENDING is allowed
    with pytest.raises(ValueError, match=rf"token {cfg.vocab_size + 7} at position 1 of the chunk in slot 2"):
        check_chunks([good, bad], geometry, cfg.vocab_size)
    with pytest.raises(ValueError, match=r"token -5 at position 0 of the chunk in slot 0"):
        check_chunks([RequestChunk(0, 0, [-5], [0])], geometry, cfg.vocab_size)
