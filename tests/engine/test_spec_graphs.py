"""Speculative decoding's fixed-shape steps (engine/spec_graphs.py) on the CPU: the packed, padded verification
batch carries the eager batch's fields on its real rows and inert padding after them, and the static-shape path
(the one CUDA graphs replay, here run eagerly from the same static buffers: `graph_capture=False`) gives exactly
the tokens of the dynamic path, and of the engine without speculation, for mixed batches: different draft
counts in one step, requests finishing mid-run, prefill chunks alongside (those steps eager), penalties (no
drafts); MTP drafts through the static extend and chain; rejected positions leave no trace.

The padded steps' GEMMs have other row counts than the dynamic ones (CPU BLAS picks its blocking by shape), so
log-probabilities and states match to fp32 rounding, not bit for bit (as tests/engine/test_graphs.py says for
decode graphs); tokens and drafts are compared exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sparsepd.default_model import DEFAULT_CHECKPOINT
from sparsepd.engine.batch import BatchShape, RequestChunk, host_fields, packed_fields_into
from sparsepd.engine.drafter import OracleDrafter
from sparsepd.engine.engine import Engine
from sparsepd.engine.pools import PoolConfig, plan_geometry
from sparsepd.engine.sampling import SamplingParams
from sparsepd.engine.spec_graphs import VerifyGraphs
from sparsepd.engine.state_io import export_state
from sparsepd.kernels.kv_rows import unpack_kv_rows
from sparsepd.load_options import LoadOptions, resolve_model_config
from sparsepd.model.mtp import load_mtp
from sparsepd.model.weights import build_model
from sparsepd.model_config import get_preset

LENGTHS = [1, 5, 16, 17, 33, 70]  # around the tiny preset's boundaries (ratio 4, HCA 16, window 16, page 16)


@pytest.fixture(scope="module")
def tiny():
    return build_model(get_preset("tiny"), seed=0)


@pytest.fixture(scope="module")
def trained():
    cfg = resolve_model_config("tiny", str(DEFAULT_CHECKPOINT), LoadOptions())
    return build_model(cfg, checkpoint=str(DEFAULT_CHECKPOINT)), load_mtp(cfg, DEFAULT_CHECKPOINT)


def _prompts(seed: int = 3) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=gen).tolist() for n in LENGTHS]


def _text_prompts() -> list[list[int]]:
    text = (DEFAULT_CHECKPOINT / "heldout_sample.txt").read_bytes()
    return [list(text[i * 97: i * 97 + n]) for i, n in enumerate(LENGTHS)]


def _pool(**kw) -> PoolConfig:
    return PoolConfig(**{"num_slots": 8, "max_batch_tokens": 40, "num_pages": 96, **kw})


def _mixed_params(eos: int) -> list[SamplingParams]:
    """Lengths that end requests at different steps (mid-run), one with penalties (it never drafts)."""
    return [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (24, 7, 19, 3, 24)] + \
        [SamplingParams(max_new_tokens=20, frequency_penalty=0.5, ignore_eos=True)]


def _run(model, prompts, params, k=0, drafter=None, mtp=None, static=False):
    engine = Engine(model, _pool(), speculative_num_steps=k, drafter=drafter, mtp=mtp, cuda_graph=static,
                    graph_capture=False)
    requests = engine.generate(prompts, params)
    assert engine.is_idle_and_empty()
    return engine, requests


def _close_logprobs(got, want) -> None:
    for g, w in zip(got, want, strict=True):
        assert len(g.output_logprobs) == len(w.output_logprobs)
        for a, b in zip(g.output_logprobs, w.output_logprobs, strict=True):
            assert abs(a.logprob - b.logprob) <= 1e-4 * max(1.0, abs(b.logprob)), (a, b)


class _Recorder:
    """Wraps VerifyGraphs.run to record each static step's chunk token counts and shape."""

    def __init__(self, monkeypatch):
        self.steps: list[tuple[list[int], BatchShape]] = []
        original = VerifyGraphs.run

        def run(graphs, chunks, shape, before_run=None):
            self.steps.append(([len(c.token_ids) for c in chunks], shape))
            return original(graphs, chunks, shape, before_run)
        monkeypatch.setattr(VerifyGraphs, "run", run)


def test_padded_verification_fields_keep_the_eager_rows_and_pad_inertly():
    """host_fields at a (bucket, k + 1, width) shape: the real rows are the unpadded batch's, request after request
    as packed; padded tokens see nothing (window rows −1, nothing visible, no HCA rows) and own no plan rows."""
    cfg = get_preset("tiny")
    geometry = plan_geometry(cfg, PoolConfig(num_slots=16, max_batch_tokens=64, num_pages=64), torch.device("cpu"))
    gen = torch.Generator().manual_seed(4)
    for trial in range(8):
        B = 1 + trial % 5
        counts = [int(torch.randint(1, 5, (1,), generator=gen)) for _ in range(B)]  # k' + 1 ∈ 1 … 4
        chunks = []
        for b, n in enumerate(counts):
            start = int(torch.randint(0, 150, (1,), generator=gen))
            pages = torch.randint(0, 64, ((start + n) // cfg.page_size + 1,), generator=gen).tolist()
            chunks.append(RequestChunk(b * 2 + 1, start, torch.randint(0, 256, (n,), generator=gen).tolist(), pages))
        shape = BatchShape(batch=B + trial % 3, pages=16, tokens_per_request=4)
        eager, padded = host_fields(chunks, geometry), host_fields(chunks, geometry, shape)
        T, R = sum(counts), len(chunks)
        assert padded["token_ids"].shape == (shape.tokens,) and padded["slots"].shape == (shape.batch,)
        for name in ("token_ids", "positions", "seq_ids", "window_rows"):
            assert torch.equal(padded[name][:T], eager[name]), (trial, name)
        assert torch.equal(padded["slots"][:R], eager["slots"]) and torch.equal(padded["last_rows"][:R],
                                                                                eager["last_rows"])
        assert bool((padded["window_rows"][T:] == -1).all())
        assert bool((padded["last_rows"][R:] >= T).all()) and bool((padded["last_rows"] < shape.tokens).all())
        for name in [n for n in eager if n.endswith("_rows") and n not in ("window_rows", "last_rows")]:
            if name.endswith("hca_rows"):
                width = eager[name].shape[1]
                assert torch.equal(padded[name][:T, :width], eager[name]), (trial, name)
                assert bool((padded[name][:T, width:] == -1).all()) and bool((padded[name][T:] == -1).all())
            else:  # a plan: the eager rows, then −1 up to the capacity
                rows = eager[name].shape[0]
                assert torch.equal(padded[name][:rows], eager[name]), (trial, name)
                assert bool((padded[name][rows:] == -1).all()) and padded[name].shape[0] == shape.tokens
        for name in [n for n in eager if n.endswith("_cu")]:
            assert torch.equal(padded[name][: R + 1], eager[name]) and bool((padded[name][R:] == eager[name][-1]).all())
        for name in [n for n in eager if n.endswith("visible")]:
            assert torch.equal(padded[name][:T], eager[name]) and bool((padded[name][T:] == 0).all())
    with pytest.raises(ValueError, match="chunks of 1"):
        host_fields([RequestChunk(0, 0, [1] * 5, [0])], geometry, BatchShape(1, 8, 4))


@pytest.mark.parametrize("preset", ["tiny", "bench"])
def test_numpy_packed_fields_equal_the_torch_builder(preset):
    """The static steps' closed-form numpy builder writes exactly host_fields' padded fields, for random batches
    of 1 … k + 1 tokens a request: positions on and off every compress boundary, ragged page tables, any slots."""
    cfg = get_preset(preset)
    geometry = plan_geometry(cfg, PoolConfig(num_slots=40, max_batch_tokens=256, num_pages=300), torch.device("cpu"))
    gen = torch.Generator().manual_seed(23)
    for trial in range(12):
        q = 1 + trial % 4
        B = int(torch.randint(0 if trial == 5 else 1, 25, (1,), generator=gen))
        shape = BatchShape(batch=max(B, 1) + int(torch.randint(0, 6, (1,), generator=gen)), pages=16,
                           tokens_per_request=q)
        slots = torch.randperm(40, generator=gen)[:B].tolist()
        chunks = []
        for b in range(B):
            n = int(torch.randint(1, q + 1, (1,), generator=gen))
            pos = int(torch.randint(0, 16 * cfg.page_size - n, (1,), generator=gen)) if trial % 3 else b * 3
            pages = torch.randint(0, 300, ((pos + n - 1) // cfg.page_size + 1,), generator=gen).tolist()
            chunks.append(RequestChunk(slots[b], pos, torch.randint(0, 256, (n,), generator=gen).tolist(), pages))
        want = host_fields(chunks, geometry, shape)
        out = {k: np.full(tuple(v.shape), 12345, dtype=v.numpy().dtype) for k, v in want.items()}  # poisoned
        packed_fields_into(chunks, geometry, shape, out)
        for name, t in want.items():
            assert np.array_equal(out[name], t.numpy()), (preset, trial, name)


@pytest.mark.parametrize("k,accept", [(3, 0.5), (3, 1.0), (2, 0.0), (1, 0.8)])
def test_static_verification_gives_the_dynamic_tokens(tiny, monkeypatch, k, accept):
    """Oracle drafts on a mixed batch (chunked prompts beside decoding requests, different lengths, one with
    penalties): the static-shape verification gives exactly the tokens of the dynamic path and of the engine
    without speculation, accepts exactly as many drafts; some static steps mix draft counts and pad."""
    prompts, params = _prompts(), _mixed_params(tiny.cfg.eos_id)
    _, want = _run(tiny, prompts, params)
    refs = {f"req-{i}": r.output_ids for i, r in enumerate(want)}
    dynamic, base = _run(tiny, prompts, params, k, OracleDrafter(refs, accept, tiny.cfg.vocab_size, seed=1))
    recorder = _Recorder(monkeypatch)
    static, got = _run(tiny, prompts, params, k, OracleDrafter(refs, accept, tiny.cfg.vocab_size, seed=1), static=True)
    assert [r.output_ids for r in got] == [r.output_ids for r in want] == [r.output_ids for r in base]
    assert [r.finish_reason for r in got] == [r.finish_reason for r in want]
    a, b = static.scheduler.stats, dynamic.scheduler.stats
    assert (a.drafted, a.accepted, a.accept_lengths) == (b.drafted, b.accepted, b.accept_lengths)
    assert static.runner.verify_graphs.steps.runs == len(recorder.steps) > 0
    assert static.runner.graphs is None  # (no one-token decode graphs beside the verification's)
    steps = recorder.steps
    assert all(max(c) <= k + 1 and s.tokens_per_request == k + 1 and s.batch >= len(c) for c, s in steps)
    if accept > 0:
        assert any(len(set(c)) > 1 for c, _ in steps)  # draft counts differ within one static step
    assert any(sum(c) < s.tokens for c, s in steps)  # padded rows
    assert len(steps) < static.scheduler.stats.verifications + len(prompts)  # prefill steps ran eagerly


def test_static_verification_logprobs_match_to_rounding(tiny):
    params = [SamplingParams(max_new_tokens=16, ignore_eos=True, logprobs=True, top_logprobs=2)] * len(LENGTHS)
    _, want = _run(tiny, _prompts(), params)
    refs = {f"req-{i}": r.output_ids for i, r in enumerate(want)}
    _, got = _run(tiny, _prompts(), params, 3, OracleDrafter(refs, 0.7, tiny.cfg.vocab_size, seed=2), static=True)
    assert [r.output_ids for r in got] == [r.output_ids for r in want]
    _close_logprobs(got, want)


@pytest.mark.parametrize("k", [1, 3])
def test_static_mtp_drafts_equal_the_dynamic_drafts(trained, k):
    """The trained MTP layer through the static extend and chain: the same drafts (so the same acceptance),
    the same tokens as the dynamic path and as without speculation."""
    model, mtp = trained
    prompts = _text_prompts()
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (24, 9, 24, 17, 4, 24)]
    _, want = _run(model, prompts, params)
    dynamic, base = _run(model, prompts, params, k, mtp=mtp)
    static, got = _run(model, prompts, params, k, mtp=mtp, static=True)
    assert [r.output_ids for r in got] == [r.output_ids for r in want] == [r.output_ids for r in base]
    assert [(r.spec_drafted, r.spec_accepted) for r in got] == [(r.spec_drafted, r.spec_accepted) for r in base]
    assert static.scheduler.stats.accepted > 0
    shapes = static.scheduler.drafter.graphs.steps._steps
    assert any(s.tokens_per_request == k + 1 for s in shapes)  # the extend ran static
    assert any(s.tokens_per_request == 1 for s in shapes) == (k > 1)  # and the chain, when there is one
    assert static.scheduler.drafter.graphs.steps.runs > 0 and static.runner.verify_graphs.steps.runs > 0


def test_static_rejected_positions_leave_no_trace(tiny):
    """The exported states after decoding with half the drafts rejected through the static path equal those
    without speculation to fp32 rounding (a rejected position's row left behind would differ by far more)."""
    prompts = _prompts()[2:6]
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    _, plain = _run(tiny, prompts, params)
    refs = {f"req-{i}": r.output_ids for i, r in enumerate(plain)}

    def states(k, drafter=None):
        engine = Engine(tiny, _pool(), speculative_num_steps=k, drafter=drafter, cuda_graph=True, graph_capture=False)
        requests = [engine.submit(p, params) for p in prompts]
        for r in requests:
            r.keep_on_finish = True
        engine.scheduler.run_to_completion()
        out = [export_state(engine.pools, r) for r in requests]
        for r in requests:
            engine.release(r)
        assert engine.is_idle_and_empty()
        return engine, [(d.position, d.output_ids, t) for d, t in out]

    _, want = states(0)
    engine, got = states(3, OracleDrafter(refs, 0.5, tiny.cfg.vocab_size, seed=5))
    assert engine.runner.verify_graphs.steps.runs > 0 and 0 < engine.scheduler.stats.accepted
    assert engine.scheduler.stats.accepted < engine.scheduler.stats.drafted
    layout = engine.pools.kv_layout
    for (p_want, out_want, a), (p_got, out_got, b) in zip(want, got, strict=True):
        assert (p_want, out_want) == (p_got, out_got) and a.keys() == b.keys()
        for name in a:
            x, y, rtol = a[name], b[name], 1e-4
            if x.dtype == torch.uint8 and layout is not None and x.shape[-1] == layout.row_bytes:  # FP8 KV rows
                x, y = unpack_kv_rows(x, layout), unpack_kv_rows(y, layout)
            elif x.dtype == torch.uint8:  # FP8 indexer rows: a rounding may move a code by one e4m3 step
                x, y = (t[..., :128].contiguous().view(torch.float8_e4m3fn) for t in (x, y))
                rtol = 0.13
            x, y = x.float(), y.float()
            scale = max(float(x.abs().max()), 1.0)
            assert torch.allclose(x, y, rtol=rtol, atol=1e-5 * scale), (name, float((x - y).abs().max()))
