"""Weights kept quantized (weight_format fp8_fp4) against the same weights dequantized (plain fp32), on the CPU.

The quantized model differs from its dequantized reference only where FP8 projections quantize their inputs per
1×128 block (the FP4 experts' arithmetic is the reference's, on exactly the dequantized values). e4m3 has 3
mantissa bits: rounding x / s (s a power of two, so the rounding is x's own) to the nearest e4m3 moves it by at most
half an ulp, ≤ 2^-4·|x|, uniformly spread, so the input's relative rms error is ≤ U = 2^-4/√3 ≈ 0.036 and so is each
projection's output error (random-like weights carry the input's relative error to the output). Through the network
each of the S quantized stages in sequence (per layer: wq_a/wkv, wq_b, wo_a, wo_b, the shared expert's w1/w3 and its
w2: 6) adds such an error; independent and undamped they add to ≤ U·√S relative rms on the logits — the bound
checked (measured: about a third of it). Greedy tokens must agree where the reference's top-2 margin is wide: more
than 3× the rms, √2·U·√S·rms(logits), of the difference of two logits' errors.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import prompt

from sparsepd.engine.engine import Engine
from sparsepd.engine.generate import generate
from sparsepd.engine.pools import PoolConfig
from sparsepd.engine.sampling import SamplingParams
from sparsepd.kernels.moe import dequant_fp4
from sparsepd.model import moe as moe_module
from sparsepd.model.linear import FP8_PROJECTIONS, ROUTED_EXPERTS, Fp8Linear
from sparsepd.model.moe import MoE
from sparsepd.model.state import RequestState
from sparsepd.model.weights import build_model
from sparsepd.model_config import get_preset

U = 2**-4 / math.sqrt(3)  # relative rms error of an e4m3-rounded input (module docstring)
STAGES_PER_LAYER = 6


def quantized_tiny(seed: int):
    """tiny with FP4-able experts (moe_inter_dim 64): its dummy quantized model and the dequantized reference."""
    cfg = get_preset("tiny", moe_inter_dim=64, weight_format="fp8_fp4")
    quantized = build_model(cfg, seed=seed, load_format="dummy")
    reference = build_model(cfg.model_copy(update={"weight_format": "plain"}), seed=seed, load_format="dummy")
    return quantized, reference


@pytest.fixture(scope="module")
def models():
    return quantized_tiny(seed=11)


def dequantized(name: str, params: dict[str, torch.Tensor]) -> torch.Tensor:
    w, scale = params[name], params[name[: -len("weight")] + "scale"]
    if w.dtype == torch.float8_e4m3fn:
        full = scale.repeat_interleave(128, 0)[: w.shape[0]].repeat_interleave(128, 1)[:, : w.shape[1]]
        return w.float() * full
    return dequant_fp4(w, scale)


def test_quantized_layout_and_its_dequantized_twin(models):
    """The quantized model holds what the checkpoint would (FP8 e4m3 + fp32 tile scales, packed FP4 + ue8m0 bytes,
    under the official names); the plain dummy model of the same seed holds exactly their values."""
    quantized, reference = models
    q, r = quantized.state_dict(), reference.state_dict()
    assert set(q) - set(r) == {n[: -len("weight")] + "scale" for n in q if FP8_PROJECTIONS.search(n)
                               or ROUTED_EXPERTS.search(n)}
    fp8 = [n for n in q if FP8_PROJECTIONS.search(n)]
    fp4 = [n for n in q if ROUTED_EXPERTS.search(n)]
    assert len(fp8) == 5 * 5 + 2 + 3 * 5 and len(fp4) == 5 * 8 * 3  # attention, indexers (2 CSA), shared; experts
    assert all(q[n].dtype == torch.float8_e4m3fn and q[n[:-6] + "scale"].dtype == torch.float32 for n in fp8)
    assert all(q[n].dtype == torch.uint8 and q[n].shape[1] * 2 == r[n].shape[1] for n in fp4)
    for name in r:
        want = dequantized(name, q) if name in fp8 or name in fp4 else q[name]
        assert torch.equal(r[name], want.to(r[name].dtype)), name
    scales = torch.cat([q[n[:-6] + "scale"].flatten() for n in fp8])
    assert len(scales.unique()) >= 3, "tile scales vary (the kernels see different scales per tile)"


def test_each_fp8_projection_is_within_the_e4m3_rounding_of_its_input(models):
    """Every FP8 projection's output against its input times the dequantized weight (fp32): relative error ≤ U."""
    quantized, _ = models
    worst: dict[str, float] = {}

    def hook(name):
        def record(module, args, out):
            x = args[0].to(module.act_dtype).float()
            want = x @ module.dequantized().T
            worst[name] = max(worst.get(name, 0.0), float((out.float() - want).norm() / want.norm()))
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in quantized.named_modules() if isinstance(m, Fp8Linear)]
    try:
        quantized.prefill(prompt(150, seed=4))
    finally:
        for h in handles:
            h.remove()
    assert len(worst) == 5 * 4 + 2 + 3 * 5, sorted(worst)  # every FP8 layer but the grouped wo_a (no module call)
    name, err = max(worst.items(), key=lambda kv: kv[1])
    assert err <= U, f"{name}: relative error {err:.4f} > U = {U:.4f}"
    assert min(worst.values()) > U / 10, "the inputs are really quantized"


def test_logits_within_the_bound_and_greedy_tokens_agree_where_the_margin_is_wide(models):
    quantized, reference = models
    bound = U * math.sqrt(STAGES_PER_LAYER * quantized.cfg.n_layers)
    wide_total = 0
    for seed in range(3):
        ids = prompt(200, seed=seed)  # every position's next-token prediction: 200 prompts, the prefixes
        got, want = quantized.prefill(ids)[0], reference.prefill(ids)[0]
        assert torch.isfinite(got).all()
        rel = float((got - want).norm() / want.norm())
        print(f"seed {seed}: logits relative error {rel:.4f} (bound {bound:.4f})")
        assert rel <= bound, f"seed {seed}: logits relative error {rel:.4f} > bound {bound:.4f}"
        assert rel > U / 10, "the quantized model is really quantized"
        top2 = want.topk(2, dim=-1).values
        margin = top2[:, 0] - top2[:, 1]
        wide = margin > 3 * math.sqrt(2) * bound * want.std(dim=-1)
        flips = (got.argmax(-1) != want.argmax(-1)) & wide
        assert not flips.any(), (f"seed {seed}: greedy tokens differ at positions {flips.nonzero().flatten().tolist()} "
                                 f"with margins {margin[flips].tolist()}")
        wide_total += int(wide.sum())
    print(f"{wide_total} of 600 predictions with a wide margin, all agree")
    assert wide_total >= 25, f"only {wide_total} of 600 predictions have a wide margin"


def test_chunked_prefill_and_decode_reproduce_one_prefill(models):
    """Batch invariance on the CPU holds for the quantized layers too: chunks and decode steps give one prefill's
    logits bit for bit."""
    quantized, _ = models
    ids = prompt(70, seed=6)
    whole = quantized.prefill(ids)[0]
    state = RequestState.fresh(quantized.cfg, quantized.device)
    parts = [quantized.forward(ids[:33], state), quantized.forward(ids[33:60], state)]
    parts += [quantized.decode(int(t), state)[None] for t in ids[60:]]
    assert torch.equal(torch.cat(parts), whole)


def test_fp4_experts_kernel_path_matches_the_loop(monkeypatch):
    """The MoE's moe_fp4 branch (Triton, here in the interpreter) on the stacked packed weights against the CPU
    per-expert loop on each expert's dequantized views."""
    cfg = get_preset("tiny", moe_inter_dim=64, weight_format="fp8_fp4")
    module = build_model(cfg, seed=5, load_format="dummy").layers[1].ffn
    assert isinstance(module, MoE) and module.fp4
    x = torch.randn(17, cfg.dim, generator=torch.Generator().manual_seed(2))
    token_ids = torch.arange(17) * 7
    want = module(x, token_ids)
    monkeypatch.setattr(moe_module, "pick_backend", lambda *_: "triton")
    calls = []
    monkeypatch.setattr(moe_module, "moe_fp4", _interpreted(moe_module.moe_fp4, calls))
    got = module(x, token_ids)
    assert calls == ["triton"]
    err = float((got - want).norm() / want.norm())
    assert err < 1e-5, err


def _interpreted(fn, calls: list):
    def call(*args, **kwargs):
        calls.append(kwargs["backend"])
        return fn(*args, **kwargs)
    return call


def test_fp4_views_follow_the_stacks_when_moved(models):
    quantized, _ = models
    moe = quantized.layers[2].ffn
    moe._apply(lambda t: t.clone())  # what .to() does to every tensor
    w13, s13, w2, s2 = moe.experts.stacks
    e, inter = 5, quantized.cfg.moe_inter_dim
    assert moe.experts[e].w3.weight.data_ptr() == w13[e, inter:].data_ptr()
    assert moe.experts[e].w1.scale.data_ptr() == s13[e, :inter].data_ptr()
    assert moe.experts[e].w2.weight.data_ptr() == w2[e].data_ptr()
    assert moe.experts[e].w2.scale.data_ptr() == s2[e].data_ptr()



def test_the_engine_batches_the_quantized_model_like_one_request_at_a_time(models):
    """Continuous batching with chunked prefill (pools, paged attention) gives each prompt the tokens of the plain
    reference loop on the quantized model."""
    quantized, _ = models
    prompts = [prompt(n, seed=20 + n).tolist() for n in (5, 37, 90)]
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    engine = Engine(quantized, PoolConfig(num_slots=4, max_batch_tokens=48, num_pages=64))
    got = [r.output_ids for r in engine.generate(prompts, params)]
    assert got == [generate(quantized, p, params).output_ids for p in prompts]
    assert engine.is_idle_and_empty()
