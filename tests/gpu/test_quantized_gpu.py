"""Weights kept quantized on the GPU (run with SPARSEPD_TEST_GPU=1): the `bench` preset with dummy FP8/FP4 weights
through the Triton FP8 GEMM and FP4 MoE kernels against the same weights dequantized to bf16 (the bounds of
tests/model/test_quantized_model.py: e4m3 rounds an input by ≤ 2^-4 of itself, rms ≤ U = 2^-4/√3, per projection;
≤ U·√S on the logits over S quantized stages), a captured decode step against the eager one, and V4-Flash's
layer dims built on the device without a full-size intermediate."""

from __future__ import annotations

import math
import os

import pytest
import torch

from sparsepd.engine.engine import Engine
from sparsepd.engine.pools import PoolConfig
from sparsepd.engine.sampling import SamplingParams
from sparsepd.load_options import LoadOptions, resolve_model_config
from sparsepd.model.linear import Fp8Linear
from sparsepd.model.weight_memory import planned_weight_bytes, weight_bytes
from sparsepd.model.weights import build_model
from sparsepd.model_config import get_preset

pytestmark = pytest.mark.skipif(os.environ.get("SPARSEPD_TEST_GPU") != "1" or not torch.cuda.is_available(),
                                reason="needs a CUDA device and SPARSEPD_TEST_GPU=1")

U = 2**-4 / math.sqrt(3)
BF16 = 2**-8  # bf16's relative rounding of a projection's output


@pytest.fixture(scope="module")
def bench_models():
    cfg = get_preset("bench", max_seq_len=4096, weight_format="fp8_fp4")
    quantized = build_model(cfg, seed=3, device="cuda", load_format="dummy")
    reference = build_model(cfg.model_copy(update={"weight_format": "plain"}), seed=3, device="cuda",
                            load_format="dummy")
    return quantized, reference


def _ids(n: int, seed: int, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).cuda()


def test_fp8_projections_within_the_e4m3_rounding_on_gpu(bench_models):
    quantized, _ = bench_models
    worst: dict[str, float] = {}

    def hook(name):
        def record(module, args, out):
            x = args[0].to(module.act_dtype).float()
            want = x @ module.dequantized().T
            worst[name] = max(worst.get(name, 0.0), float((out.float() - want).norm() / want.norm()))
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in quantized.named_modules() if isinstance(m, Fp8Linear)]
    try:
        quantized.prefill(_ids(300, seed=1, vocab=quantized.cfg.vocab_size))
    finally:
        for h in handles:
            h.remove()
    name, err = max(worst.items(), key=lambda kv: kv[1])
    assert err <= U + BF16, f"{name}: relative error {err:.4f} > {U + BF16:.4f}"
    assert min(worst.values()) > U / 10


def test_bench_quantized_logits_within_the_bound_and_greedy_agrees_on_wide_margins(bench_models):
    quantized, reference = bench_models
    bound = U * math.sqrt(6 * quantized.cfg.n_layers) + BF16
    wide_total = total = 0
    for seed in range(8):
        ids = _ids(512, seed=seed, vocab=quantized.cfg.vocab_size)
        got, want = quantized.prefill(ids)[0], reference.prefill(ids)[0]
        assert torch.isfinite(got).all()
        rel = float((got - want).norm() / want.norm())
        print(f"seed {seed}: logits relative error {rel:.4f} (bound {bound:.4f})")
        assert U / 10 < rel <= bound, (seed, rel, bound)
        top2 = want.topk(2, dim=-1).values
        wide = top2[:, 0] - top2[:, 1] > 3 * math.sqrt(2) * bound * want.std(dim=-1)
        flips = (got.argmax(-1) != want.argmax(-1)) & wide
        assert not flips.any(), (seed, flips.nonzero().flatten().tolist())
        wide_total += int(wide.sum())
        total += wide.numel()
    print(f"{wide_total} of {total} predictions with a wide margin, all agree")
    assert wide_total >= 20, wide_total


def test_quantized_graph_step_equals_eager_on_gpu(bench_models):
    """One decode step, same state, eager vs the captured graph (no host sync in the FP8/FP4 path, or capture
    fails), each also against a whole prefill of the same tokens. The two steps differ in shape (the graph pads the
    3 rows to its bucket), so in bf16 GEMM tiles, and on this dummy model a one-ulp bf16 difference can move an FP8
    rounding (activations, KV rows) and the logits by a jump. Measured on an H200 (2026-12-06): graph vs eager 0.017
    with bf16 KV rows and 0.038 with FP8 rows; each path 0.02-0.04 from the whole prefill (one row 0.06, in both
    paths alike). A capture that loses, repeats or reorders work differs by O(1). Bounds: both paths within
    NOISE = 0.1 of the whole prefill and of each other; greedy equal where the margin exceeds twice the row's
    difference."""
    quantized, _ = bench_models
    noise = 0.1
    logits, tokens = {}, {}
    for cuda_graph in (False, True):
        engine = Engine(quantized, PoolConfig(num_slots=8, max_batch_tokens=512, num_pages=32), cuda_graph=cuda_graph)
        params = SamplingParams(max_new_tokens=4, ignore_eos=True)
        reqs = [engine.submit(_ids(n, seed=n, vocab=256).tolist(), params) for n in (5, 130, 300)]
        while any(r.prefilling or not r.output_ids for r in reqs):
            engine.step()
        tokens[cuda_graph] = [r.prompt_ids + r.output_ids for r in reqs]
        logits[cuda_graph] = engine.runner.forward([(r, r.next_tokens(1)) for r in reqs]).clone()
        if cuda_graph:
            assert engine.runner.graphs.num_graphs == 1
    assert tokens[True] == tokens[False]
    whole = torch.stack([quantized.prefill(torch.tensor(t, device="cuda"))[0][-1] for t in tokens[False]]).float()
    graph, eager = logits[True].float(), logits[False].float()
    assert torch.isfinite(graph).all() and torch.isfinite(eager).all()

    def rel(a, b):
        return float((a - b).norm() / b.norm())
    print(f"graph vs eager {rel(graph, eager):.4f}, eager vs whole {rel(eager, whole):.4f}, "
          f"graph vs whole {rel(graph, whole):.4f}")
    assert rel(eager, whole) < noise and rel(graph, whole) < noise
    assert rel(graph, eager) < noise
    diff = (graph - eager).abs().amax(-1)
    top2 = eager.topk(2, dim=-1).values
    clear = top2[:, 0] - top2[:, 1] > 2 * diff
    assert torch.equal(graph.argmax(-1)[clear], eager.argmax(-1)[clear])


def test_v4_flash_dims_built_on_the_device_without_a_full_size_copy():
    """Two V4-Flash layers (256 FP4 experts each), dummy: the bytes the plan says, a build peak of at most the
    weights plus 1 GiB (chunked generation, no bf16 intermediate), O(1) activations."""
    cfg = resolve_model_config("v4-flash", None, LoadOptions(load_format="dummy", num_layers=2))
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    model = build_model(cfg, seed=0, device="cuda", load_format="dummy")
    kinds = weight_bytes(model)
    assert kinds == planned_weight_bytes(cfg)
    assert torch.cuda.max_memory_allocated() - before <= sum(kinds.values()) + 2**30
    ids = _ids(64, seed=2, vocab=cfg.vocab_size)
    logits, hidden = model.forward(ids, model.new_state(), return_hidden=True)
    rms = [h.float().pow(2).mean().sqrt().item() for h in hidden]
    assert torch.isfinite(logits).all() and all(0.3 < r < 3.0 for r in rms), rms
