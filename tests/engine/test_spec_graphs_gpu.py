"""Speculative decoding with CUDA graphs (engine/spec_graphs.py) on a CUDA device (SPARSEPD_TEST_GPU=1): the
verification and the MTP drafts replay captured graphs, and the greedy tokens equal those with graphs off and
those of the engine without speculation (its default path: decode graphs and overlap). The trained default model
compares exactly (its fp32 margins are wide, as tests/engine/test_speculative_gpu.py relies on); fp32 `tiny`
without the discontinuous steps (FP8 KV, a dropping top-k) and the dummy `bench` model compare up to the
reference's first near-tie (a padded batch may take other GEMM tiles). The CPU tests of the same static-shape
path: tests/engine/test_spec_graphs.py."""

from __future__ import annotations

import os

import pytest
import torch

from sparsepd.default_model import DEFAULT_CHECKPOINT
from sparsepd.engine.drafter import OracleDrafter
from sparsepd.engine.engine import Engine
from sparsepd.engine.pools import PoolConfig
from sparsepd.engine.sampling import SamplingParams
from sparsepd.load_options import LoadOptions, resolve_model_config
from sparsepd.model.mtp import load_mtp
from sparsepd.model.weights import build_model
from sparsepd.model_config import get_preset

GPU = os.environ.get("SPARSEPD_TEST_GPU") == "1" and torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not GPU, reason="needs a CUDA device and SPARSEPD_TEST_GPU=1")


def _generate(engine: Engine, prompts, params) -> list[list[int]]:
    out = [r.output_ids for r in engine.generate(prompts, params)]
    assert engine.is_idle_and_empty()
    return out


def _prompts(lengths: list[int], seed: int, vocab: int = 256) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]


@pytest.mark.parametrize("accept", [0.0, 0.5, 1.0])
def test_graph_verification_equals_eager_and_plain_on_tiny(accept):
    model = build_model(get_preset("tiny", quantize_kv=False, index_topk=256), seed=0, device="cuda")
    pool = PoolConfig(num_slots=8, max_batch_tokens=64, num_pages=96)
    prompts = _prompts([1, 5, 16, 17, 33, 70], seed=3)
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (24, 7, 19, 3, 24)] + \
        [SamplingParams(max_new_tokens=20, frequency_penalty=0.5, ignore_eos=True)]  # no drafts: k' = 0
    reference = Engine(model, pool, cuda_graph=True, overlap=True)
    scored = reference.generate(prompts, [p.model_copy(update=dict(logprobs=True, top_logprobs=2)) for p in params])
    assert reference.is_idle_and_empty()
    want = [r.output_ids for r in scored]
    refs = {f"req-{i}": w for i, w in enumerate(want)}
    outputs = {}
    for graphs in (False, True):
        engine = Engine(model, pool, cuda_graph=graphs, speculative_num_steps=3,
                        drafter=OracleDrafter(refs, accept, model.cfg.vocab_size, seed=1))
        outputs[graphs] = _generate(engine, prompts, params)
        if graphs:
            verify = engine.runner.verify_graphs
            assert verify.steps.capture and verify.steps.num_graphs >= 1 and verify.steps.runs > 0
            assert engine.runner.graphs is None
        else:
            assert engine.runner.verify_graphs is None
    for got in outputs.values():  # fp32: the padded rows' GEMM tiles move only near-ties
        for g, ref in zip(got, scored, strict=True):
            agree_up_to_a_near_tie(g, ref, margin=1e-3)


def test_graph_verification_and_mtp_drafts_on_the_default_model():
    cfg = resolve_model_config("tiny", str(DEFAULT_CHECKPOINT), LoadOptions())
    model = build_model(cfg, checkpoint=str(DEFAULT_CHECKPOINT), device="cuda")
    mtp = load_mtp(cfg, DEFAULT_CHECKPOINT).to("cuda")
    text = (DEFAULT_CHECKPOINT / "heldout_sample.txt").read_bytes()
    prompts = [list(text[i * 97: i * 97 + n]) for i, n in enumerate([1, 5, 16, 17, 33, 70])]
    params = SamplingParams(max_new_tokens=48, ignore_eos=True)
    pool = PoolConfig(num_slots=8, max_batch_tokens=256, num_pages=96)
    want = _generate(Engine(model, pool, cuda_graph=True, overlap=True), prompts, params)
    for k in (1, 3):
        eager = Engine(model, pool, cuda_graph=False, speculative_num_steps=k, mtp=mtp)
        graphs = Engine(model, pool, cuda_graph=True, speculative_num_steps=k, mtp=mtp)
        graphs.capture_graphs(256)
        assert _generate(eager, prompts, params) == want, f"k={k} eager"
        assert _generate(graphs, prompts, params) == want, f"k={k} graphs"
        drafter = graphs.scheduler.drafter
        assert drafter.graphs.steps.num_graphs > 0 and drafter.graphs.steps.runs > 0
        assert graphs.runner.verify_graphs.steps.runs > 0
        assert graphs.scheduler.stats.accepted > 0


@pytest.mark.parametrize("accept", [0.0, 0.8, 1.0])
def test_bench_preset_graph_verification(accept):
    cfg = get_preset("bench")
    model = build_model(cfg, seed=0, device="cuda", load_format="dummy")
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 30000, (n,), generator=gen).tolist() for n in (1, 130, 600, 1023)]
    params = SamplingParams(max_new_tokens=32, ignore_eos=True)
    pool = PoolConfig(num_slots=4, max_batch_tokens=2048, num_pages=48)
    reference = Engine(model, pool, cuda_graph=True, overlap=True)
    refs = reference.generate(prompts, SamplingParams(max_new_tokens=32, ignore_eos=True, logprobs=True,
                                                      top_logprobs=2))
    assert reference.is_idle_and_empty()
    want = [r.output_ids for r in refs]
    drafter = OracleDrafter({f"req-{i}": w for i, w in enumerate(want)}, accept, cfg.vocab_size, seed=1)
    engine = Engine(model, pool, cuda_graph=True, speculative_num_steps=3, drafter=drafter)
    engine.capture_graphs(1024 + 64)
    got = _generate(engine, prompts, params)
    for g, ref in zip(got, refs, strict=True):
        agree_up_to_a_near_tie(g, ref)
    assert engine.runner.verify_graphs.steps.runs > 0
    stats = engine.scheduler.stats
    if accept < 1.0:
        assert stats.accepted < stats.drafted
    elif got == want:
        assert stats.accepted == stats.drafted


def agree_up_to_a_near_tie(got: list[int], ref, margin: float = 0.1) -> None:
    """As in tests/engine/test_speculative_gpu.py: equal up to the reference's first top-2 gap below `margin`."""
    assert len(got) == len(ref.output_ids)
    for i, lp in enumerate(ref.output_logprobs):
        if lp.top_logprobs[0] - lp.top_logprobs[1] < margin:
            return
        assert got[i] == ref.output_ids[i], f"token {i}: {got[i]} != {ref.output_ids[i]} (margin " \
            f"{lp.top_logprobs[0] - lp.top_logprobs[1]:.3f})"


def test_a_garbage_collection_during_capture_leaves_the_capture_intact():
    """An older engine's captured graphs left in an unreferenced cycle: a collection that ran mid-capture would
    destroy one of them while the stream captures and invalidate the capture (bench_spec's fresh engine per prompt
    did this). With the collector eager (threshold 1) the new engine still captures, and its tokens equal eager."""
    import gc

    cfg = resolve_model_config("tiny", str(DEFAULT_CHECKPOINT), LoadOptions())
    model = build_model(cfg, checkpoint=str(DEFAULT_CHECKPOINT), device="cuda")
    mtp = load_mtp(cfg, DEFAULT_CHECKPOINT).to("cuda")
    prompts = _prompts([9, 40], seed=5)
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    pool = PoolConfig(num_slots=2, max_batch_tokens=64, num_pages=32)
    want = _generate(Engine(model, pool, cuda_graph=False, speculative_num_steps=2, mtp=mtp), prompts, params)
    saved = gc.get_threshold()
    for _ in range(3):
        old = Engine(model, pool, cuda_graph=True, speculative_num_steps=2, mtp=mtp)
        old.capture_graphs(64)
        old.cycle = old  # garbage only a collection frees
        del old
    gc.set_threshold(1, 1, 1)
    try:
        engine = Engine(model, pool, cuda_graph=True, speculative_num_steps=2, mtp=mtp)
        engine.capture_graphs(64)
        got = _generate(engine, prompts, params)
    finally:
        gc.set_threshold(*saved)
    assert got == want
    assert engine.scheduler.drafter.graphs.steps.num_graphs > 0 and engine.runner.verify_graphs.steps.num_graphs > 0
    assert gc.isenabled()
