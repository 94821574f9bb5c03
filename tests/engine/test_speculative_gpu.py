"""Speculative decoding on a CUDA device (SPARSEPD_TEST_GPU=1): the default model's MTP drafts and oracle drafts
on the `bench` preset give the tokens of the engine without speculation (its default path: CUDA graphs and
overlap), the pools return to full. The CPU tests (tests/engine/test_speculative.py) check exactness bit for bit;
on the GPU a verification's k + 1 rows go through other kernels' tiles than one row, so these compare tokens (the
dummy bench model's up to its first near-tie)."""

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


def test_default_model_mtp_drafts_on_the_gpu():
    cfg = resolve_model_config("tiny", str(DEFAULT_CHECKPOINT), LoadOptions())
    model = build_model(cfg, checkpoint=str(DEFAULT_CHECKPOINT), device="cuda")
    mtp = load_mtp(cfg, DEFAULT_CHECKPOINT).to("cuda")
    text = (DEFAULT_CHECKPOINT / "heldout_sample.txt").read_bytes()
    prompts = [list(text[i * 97: i * 97 + n]) for i, n in enumerate([1, 5, 16, 17, 33, 70])]
    params = SamplingParams(max_new_tokens=48, ignore_eos=True)
    pool = PoolConfig(num_slots=8, max_batch_tokens=256, num_pages=96)
    want = _generate(Engine(model, pool, cuda_graph=True, overlap=True), prompts, params)
    for k in (1, 3):
        engine = Engine(model, pool, speculative_num_steps=k, mtp=mtp)
        assert _generate(engine, prompts, params) == want, f"k={k}"
        assert engine.scheduler.stats.accepted > 0


@pytest.mark.parametrize("accept", [0.0, 0.8, 1.0])
def test_bench_preset_oracle_drafts_on_the_gpu(accept):
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
    engine = Engine(model, pool, speculative_num_steps=3, drafter=drafter)
    got = _generate(engine, prompts, params)
    for g, ref in zip(got, refs, strict=True):
        agree_up_to_a_near_tie(g, ref)
    stats = engine.scheduler.stats
    if accept < 1.0:
        assert stats.accepted < stats.drafted
    elif got == want:  # the oracle drafts the reference's tokens: all of them are taken while the outputs agree
        assert stats.accepted == stats.drafted


def agree_up_to_a_near_tie(got: list[int], ref, margin: float = 0.1) -> None:
    """The tokens equal the reference's up to the first position where its top two log-probabilities are within
    `margin` of each other (a near-tie that a bf16 rounding of another tile can flip: the dummy model's
    distributions are nearly flat); from there different tokens are fed and nothing is left to compare."""
    assert len(got) == len(ref.output_ids)
    for i, lp in enumerate(ref.output_logprobs):
        if lp.top_logprobs[0] - lp.top_logprobs[1] < margin:
            return
        assert got[i] == ref.output_ids[i], f"token {i}: {got[i]} != {ref.output_ids[i]} (margin " \
            f"{lp.top_logprobs[0] - lp.top_logprobs[1]:.3f})"
