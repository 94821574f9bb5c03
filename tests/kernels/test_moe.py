"""kernels/moe.py: the sync-free dispatch and the grouped expert GEMMs against an fp64 reference.

On CPU the kernels run in the Triton interpreter at small shapes with fp32/fp16 inputs (the interpreter has
no bf16 dot); with SPARSEPD_TEST_GPU=1 the GPU tests run bf16 at the `bench` preset's MoE shapes, and the
MoE module's forward is captured in a CUDA graph and replayed. FP4 experts (`moe_fp4`): the packing round trip
bit for bit, then the same checks with packed e2m1 weights, against `moe_fp4_ref` in fp64 (dequantizing is
exact, so the bound is the bf16/fp16 one of `moe`).
"""

import dataclasses
import os

import pytest
import torch

from sparsepd.kernels.moe import (
    _E2M1,
    _FP4_CONFIG_TABLE,
    _FP4_DECODE_BLOCK_N,
    FP4_GROUP,
    PTX_MAX_BLOCK_M,
    MoEConfig,
    _weight_format,
    build_dispatch,
    build_dispatch_ref,
    default_moe_fp4_config,
    dequant_fp4,
    dispatch_capacity,
    moe,
    moe_fp4,
    moe_fp4_ref,
    moe_ref,
)
from sparsepd.model import moe as moe_module
from sparsepd.model.moe import Gate, MoE
from sparsepd.model.weights import _unpack_fp4
from sparsepd.model_config import get_preset

ON_GPU = os.environ.get("SPARSEPD_TEST_GPU") == "1"
needs_gpu = pytest.mark.skipif(not ON_GPU or not torch.cuda.is_available(),
                               reason="needs a CUDA device and SPARSEPD_TEST_GPU=1")

# Relative error bounds vs fp64 (max abs error over max |y|), on top of "no worse than 2× the reference's own
# error in the same dtype".
TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}
SMALL = dict(E=8, k=2, dim=64, inter=48)  # the `tiny` preset's MoE
CONFIGS = [MoEConfig(16, 32, 32), MoEConfig(32, 16, 64, num_warps=2)]  # masked n and k tails at dim 64, inter 48


def make_weights(seed, E, dim, inter, dtype, device, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    w13 = torch.randn(E, 2 * inter, dim, generator=g) * (scale / dim**0.5)
    w2 = torch.randn(E, dim, inter, generator=g) / inter**0.5
    return w13.to(device, dtype), w2.to(device, dtype)


def make_routing(seed, T, cfg, routing, device):
    """x and the `Gate`'s (weights, indices): hash layer (indices from tid2eid) or biased top-k."""
    g = torch.Generator().manual_seed(seed)
    gate = Gate(cfg, layer_id=0 if routing == "hash" else cfg.n_hash_layers, dtype=torch.float32)
    with torch.no_grad():
        gate.weight.copy_(torch.randn(gate.weight.shape, generator=g) / cfg.dim**0.5)
        if routing == "hash":
            gate.tid2eid.copy_(torch.rand(cfg.vocab_size, cfg.n_routed_experts, generator=g)
                               .argsort(-1)[:, : cfg.n_activated_experts])
        else:
            gate.bias.copy_(torch.randn(cfg.n_routed_experts, generator=g))
    x = torch.randn(T, cfg.dim, generator=g)
    token_ids = torch.randint(0, cfg.vocab_size, (T,), generator=g)
    gate = gate.to(device)
    weights, indices = gate(x.to(device), token_ids.to(device))
    return x.to(device), weights, indices


def rel_err(got, want):
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30)).item()


def check_against_fp64(got, x, weights, indices, w13, w2, limit, what):
    """got (fp32 [T, dim]) vs moe_ref in fp64; the bound is relative to moe_ref's own error in x's dtype."""
    truth = moe_ref(x.double(), weights.double(), indices, w13.double(), w2.double(), limit)
    same_dtype = moe_ref(x, weights, indices, w13, w2, limit)
    err, ref_err = rel_err(got, truth), rel_err(same_dtype, truth)
    assert torch.isfinite(got).all(), f"{what}: non-finite output at {(~torch.isfinite(got)).nonzero()[:5].tolist()}"
    worst = (got.double() - truth).abs().flatten().argmax().item()
    assert err <= 2 * ref_err + 1e-6 and err <= TOL[x.dtype], (
        f"{what}: relative error {err:.3g} (reference in {x.dtype}: {ref_err:.3g}); worst [t, d] = "
        f"{divmod(worst, got.shape[1])}: got {got.flatten()[worst].item()}, want {truth.flatten()[worst].item()}")
    return truth


def run_poisoned(x, weights, indices, w13, w2, limit, config=None):
    """The Triton path with a NaN-poisoned per-pair buffer: every (token, slot) row must be written."""
    T, k = indices.shape
    out = torch.full((T, k, x.shape[1]), float("nan"), dtype=torch.float32, device=x.device)
    y = moe(x, weights, indices, w13, w2, limit, out=out, backend="triton", config=config)
    missing = (~torch.isfinite(out)).any(-1).nonzero()
    assert missing.numel() == 0, f"(token, slot) rows left unwritten: {missing[:8].tolist()}"
    return y, out


# --- dispatch -------------------------------------------------------------------------------------
def check_dispatch(plan, indices, E):
    T, k = indices.shape
    block_m = plan.block_m
    capacity = dispatch_capacity(T * k, E, block_m)
    assert plan.sorted_pairs.shape == (capacity,) and plan.sorted_pairs.dtype == torch.int32
    assert plan.block_expert.shape == (capacity // block_m,) and plan.block_expert.dtype == torch.int32
    pairs, blocks = plan.sorted_pairs.cpu(), plan.block_expert.cpu()
    flat = indices.reshape(-1).cpu().long()
    real = pairs[pairs >= 0].long()
    assert torch.equal(real.sort().values, torch.arange(T * k)), "every (token, slot) pair exactly once"
    row_expert = blocks.repeat_interleave(block_m)
    assert torch.equal(flat[real], row_expert[pairs >= 0].long()), "a row sits in a block of another expert"
    counts = torch.bincount(flat, minlength=E)
    n_blocks = int(((counts + block_m - 1) // block_m).sum())
    assert (blocks[:n_blocks] >= 0).all() and (blocks[n_blocks:] == -1).all()
    assert (pairs[n_blocks * block_m:] == -1).all(), "rows past the last group must be padding"
    assert torch.equal(blocks[:n_blocks], blocks[:n_blocks].sort().values), "groups in expert order"
    for e in flat.unique().tolist():
        group = pairs[row_expert == e]
        n = int(counts[e])
        assert (group[:n] >= 0).all() and (group[n:] == -1).all(), f"expert {e}: padding before its rows"
        assert torch.equal(group[:n], group[:n].sort().values), f"expert {e}: not in token order"
    return plan


def make_indices(seed, T, k, E):
    """Three routings: distinct experts per token, every token on experts 0..k-1 (groups longer than a block),
    and clustered ids (repeats within a token, empty experts)."""
    g = torch.Generator().manual_seed(seed)
    return {"spread": torch.rand(T, E, generator=g).argsort(-1)[:, :k],
            "skewed": torch.arange(k).repeat(T, 1),
            "clustered": torch.randint(0, max(1, E // 4), (T, k), generator=g)}


@pytest.mark.parametrize("block_m", [16, 64])
@pytest.mark.parametrize("T, k, E", [(1, 1, 8), (3, 2, 8), (17, 2, 8), (2**6 + 17, 6, 16), (300, 6, 256)])
def test_dispatch_ref_pairs_once_and_shapes_fixed(T, k, E, block_m):
    routings = make_indices(T * 100 + k * 10 + E, T, k, E)
    shapes = {tuple(check_dispatch(build_dispatch_ref(idx, E, block_m), idx, E).sorted_pairs.shape)
              for idx in (*routings.values(), routings["spread"].to(torch.int32))}
    assert shapes == {(dispatch_capacity(T * k, E, block_m),)}


@pytest.mark.parametrize("max_chunk", [16, 2048])  # many chunks (a counting launch first), or one
@pytest.mark.parametrize("T, k, E, block_m", [(1, 1, 8, 16), (3, 2, 8, 16), (17, 2, 8, 64), (21, 6, 16, 16),
                                              (5, 6, 256, 32)])
def test_dispatch_triton_equals_ref(T, k, E, block_m, max_chunk, device):
    for name, idx in make_indices(T * 100 + k * 10 + E, T, k, E).items():
        idx = idx.to(device)
        if name == "clustered":
            idx = idx.to(torch.int32).t().contiguous().t()  # int32, strided: read in place
        want = build_dispatch_ref(idx, E, block_m)
        got = check_dispatch(build_dispatch(idx, E, block_m, backend="triton", max_chunk=max_chunk), idx, E)
        for field in ("sorted_pairs", "block_expert"):
            a, b = getattr(got, field).cpu(), getattr(want, field).cpu()
            bad = (a != b).nonzero().flatten()
            assert bad.numel() == 0, f"{name} T={T} k={k} E={E} bm={block_m}: {field} differs at {bad[:8].tolist()}"


def test_dispatch_needs_no_values():
    """Built from shapes alone (meta tensors hold no data): nothing reads a value on the host."""
    plan = build_dispatch_ref(torch.empty(37, 6, dtype=torch.int64, device="meta"), 16, 16)
    assert plan.sorted_pairs.shape == (dispatch_capacity(37 * 6, 16, 16),)
    assert plan.block_expert.shape == (dispatch_capacity(37 * 6, 16, 16) // 16,)


# --- grouped GEMMs in the interpreter --------------------------------------------------------------
@pytest.mark.parametrize("routing", ["topk", "hash"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T", [1, 3, 17])
def test_matches_reference(T, dtype, routing, device):
    cfg = get_preset("tiny")
    seed = T * 10 + (routing == "hash")
    x, weights, indices = make_routing(seed, T, cfg, routing, device)
    w13, w2 = make_weights(seed, SMALL["E"], SMALL["dim"], SMALL["inter"], dtype, device)
    x = x.to(dtype)
    y, out = run_poisoned(x, weights, indices, w13, w2, cfg.swiglu_limit, config=CONFIGS[T % 2])
    check_against_fp64(y, x, weights, indices, w13, w2, cfg.swiglu_limit, f"seed={seed} T={T} {dtype} {routing}")
    for j in range(indices.shape[1]):  # each slot's output at its own (token, slot) row
        check_against_fp64(out[:, j], x, weights[:, j:j + 1], indices[:, j:j + 1], w13, w2, cfg.swiglu_limit,
                           f"seed={seed} T={T} {dtype} {routing} slot {j}")


@pytest.mark.parametrize("config", CONFIGS)
def test_experts_with_more_rows_than_a_block(config, device):
    """All 40 tokens on experts 3 and 5: each group spans several blocks, the last one partly padding."""
    T, E, k = 40, SMALL["E"], SMALL["k"]
    g = torch.Generator().manual_seed(7)
    x = torch.randn(T, SMALL["dim"], generator=g).to(device)
    indices = torch.tensor([[3, 5]] * T, device=device)
    weights = torch.rand(T, k, generator=g).to(device)
    w13, w2 = make_weights(7, E, SMALL["dim"], SMALL["inter"], torch.float32, device)
    y, _ = run_poisoned(x, weights, indices, w13, w2, 10.0, config=config)
    check_against_fp64(y, x, weights, indices, w13, w2, 10.0, f"skewed {config}")


@pytest.mark.parametrize("limit", [10.0, 0.0])
def test_swiglu_clamp(limit, device):
    """Weights 20× larger push most gate/up values past the limit: the clamp must bite, and match."""
    T, cfg = 17, get_preset("tiny")
    x, weights, indices = make_routing(3, T, cfg, "topk", device)
    w13, w2 = make_weights(3, SMALL["E"], SMALL["dim"], SMALL["inter"], torch.float32, device, scale=20.0)
    inter = SMALL["inter"]
    pre = torch.einsum("td,tjnd->tjn", x.double(), w13[indices].double())  # [T, k, 2·inter]
    assert (pre[..., inter:].abs() > 10.0).float().mean() > 0.5 and (pre[..., :inter] > 10.0).any()
    clamped = moe_ref(x.double(), weights.double(), indices, w13.double(), w2.double(), 10.0)
    free = moe_ref(x.double(), weights.double(), indices, w13.double(), w2.double(), 0.0)
    assert rel_err(clamped, free) > 0.1, "the clamp does not change the result: the test would not see it"
    y, _ = run_poisoned(x, weights, indices, w13, w2, limit, config=CONFIGS[0])
    truth = check_against_fp64(y, x, weights, indices, w13, w2, limit, f"limit={limit}")
    assert torch.equal(truth, clamped if limit > 0 else free)


@pytest.mark.parametrize("limit", [10.0, 0.0])
def test_nan_input_is_not_hidden(limit, device):
    """A NaN in x reaches that token's output, through the clamp too (a masked or clamped row would hide it)."""
    T, cfg = 3, get_preset("tiny")
    x, weights, indices = make_routing(5, T, cfg, "topk", device)
    w13, w2 = make_weights(5, SMALL["E"], SMALL["dim"], SMALL["inter"], torch.float32, device)
    x[1, 7] = float("nan")
    y = moe(x, weights, indices, w13, w2, limit, backend="triton", config=CONFIGS[0])
    assert torch.isnan(y[1]).all() and torch.isfinite(y[[0, 2]]).all()


def test_bad_inputs_are_refused():
    x = torch.zeros(3, 64)
    w13, w2 = make_weights(0, 8, 64, 48, torch.float32, "cpu")
    idx, wts = torch.zeros(3, 2, dtype=torch.int64), torch.zeros(3, 2)
    with pytest.raises(ValueError, match="w2 must be"):
        moe(x, wts, idx, w13, w2[:, :, :40], 10.0)
    with pytest.raises(TypeError, match="share a dtype"):
        moe(x.half(), wts, idx, w13, w2, 10.0)
    with pytest.raises(ValueError, match="out must be"):
        moe(x, wts, idx, w13, w2, 10.0, out=torch.zeros(3, 2, 63))
    with pytest.raises(ValueError, match="power of two"):
        moe(x, wts, idx, w13, w2, 10.0, backend="triton", config=MoEConfig(16, 24, 32))


# --- the module --------------------------------------------------------------------------------
def fill_moe(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("tid2eid"):
                p.copy_(torch.rand(p.shape[0], module.gate.weight.shape[0], generator=g).argsort(-1)[:, : p.shape[1]])
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    return module


def test_module_stacks_weights_once_as_views(monkeypatch, device):
    """The Triton branch of MoE.forward (forced on the CPU): the stacked weights become the parameters' storage
    (state_dict and in-place loads still work), and the result matches the per-expert loop."""
    cfg = get_preset("tiny")
    module = fill_moe(MoE(cfg, layer_id=1), seed=1).to(device)
    x = torch.randn(17, cfg.dim, generator=torch.Generator().manual_seed(2)).to(device)
    token_ids = torch.arange(17, device=device)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    monkeypatch.setenv("SPARSEPD_FORCE_REFERENCE", "1")
    want = module(x, token_ids)
    assert module._stacked is None, "the loop path must not stack"
    monkeypatch.setattr(moe_module, "pick_backend", lambda *_: "triton")
    got = module(x, token_ids)
    w13, w2 = module._stacked
    assert module.stacked_weights()[0] is w13, "built once"
    after = module.state_dict()
    assert list(after) == list(before) and all(torch.equal(before[k], after[k]) for k in before)
    assert module.experts[2].w3.weight.data_ptr() == w13[2, cfg.moe_inter_dim:].data_ptr()
    assert module.experts[7].w2.weight.data_ptr() == w2[7].data_ptr()
    assert rel_err(got, want) < TOL[torch.float32], rel_err(got, want)
    module.load_state_dict({**before, "experts.4.w1.weight": torch.ones_like(before["experts.4.w1.weight"])})
    assert (w13[4, : cfg.moe_inter_dim] == 1).all(), "an in-place load reaches the stacked copy"


def test_cpu_forward_unchanged_by_stacking():
    """The CPU path is the per-expert loop, bit for bit, also once the parameters are views."""
    cfg = get_preset("tiny")
    module = fill_moe(MoE(cfg, layer_id=0), seed=3)
    x = torch.randn(9, cfg.dim, generator=torch.Generator().manual_seed(4))
    token_ids = torch.arange(9) * 13
    want = module(x, token_ids)
    module.stacked_weights()
    assert torch.equal(module(x, token_ids), want)


# --- GPU: the bench preset's shapes, and a CUDA graph ----------------------------------------------
@needs_gpu
@pytest.mark.parametrize("routing", ["topk", "hash"])
@pytest.mark.parametrize("T", [1, 64, 256])
def test_bench_shapes_bf16_on_gpu(T, routing):
    cfg = get_preset("bench")
    seed = T + (routing == "hash")
    x, weights, indices = make_routing(seed, T, cfg, routing, "cuda")
    w13, w2 = make_weights(seed, cfg.n_routed_experts, cfg.dim, cfg.moe_inter_dim, torch.bfloat16, "cuda",
                           scale=8.0)  # the clamp bites on some values
    x = x.to(torch.bfloat16)
    y, _ = run_poisoned(x, weights, indices, w13, w2, cfg.swiglu_limit)
    check_against_fp64(y, x, weights, indices, w13, w2, cfg.swiglu_limit, f"seed={seed} T={T} {routing}")


@needs_gpu
@pytest.mark.parametrize("layer_id", [0, 1])  # hash routing, biased top-k
@pytest.mark.parametrize("T", [1, 64, 256])
def test_module_cuda_graph_replay_equals_eager(T, layer_id):
    with torch.inference_mode():
        graph_replay_equals_eager(T, layer_id)


def graph_replay_equals_eager(T, layer_id):
    cfg = get_preset("bench")
    module = fill_moe(MoE(cfg, layer_id), seed=layer_id).to("cuda")
    g = torch.Generator().manual_seed(T)
    inputs = [(torch.randn(T, cfg.dim, generator=g).to("cuda", torch.bfloat16),
               torch.randint(0, cfg.vocab_size, (T,), generator=g).cuda()) for _ in range(2)]
    eager = [module(x, ids) for x, ids in inputs]  # the first call stacks the weights
    again = module(*inputs[0])
    assert torch.equal(again, eager[0]), (  # tells a non-deterministic eager forward from a capture problem
        f"T={T} layer {layer_id}: two eager forwards differ in {(again != eager[0]).sum().item()} elements "
        f"({rel_err(again, eager[0]):.3g})")
    static_x, static_ids = inputs[0][0].clone(), inputs[0][1].clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        module(static_x, static_ids)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = module(static_x, static_ids)
    for (x, ids), want in zip(inputs, eager, strict=True):
        static_x.copy_(x)
        static_ids.copy_(ids)
        graph.replay()
        torch.cuda.synchronize()
        bad = (static_out != want).any(-1).nonzero().flatten()
        assert torch.equal(static_out, want), (
            f"T={T} layer {layer_id}: replay differs from eager in tokens {bad[:16].tolist()} ({bad.numel()} of {T}), "
            f"{rel_err(static_out, want):.3g}")


# --- FP4 experts ---------------------------------------------------------------------------------
E2M1_CODES = {v: c for c, v in enumerate(_E2M1) if c != 8}  # value → code (−0.0 handled by its sign)


def make_fp4_weights(seed, E, dim, inter, device, scale_bytes=(118, 124)):
    """Random packed e2m1 bytes (every code) and ue8m0 scale bytes (2^−9 … 2^−4: weights ~0.01-0.4)."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = scale_bytes
    w13 = torch.randint(0, 256, (E, 2 * inter, dim // 2), generator=g, dtype=torch.uint8)
    s13 = torch.randint(lo, hi, (E, 2 * inter, dim // FP4_GROUP), generator=g, dtype=torch.uint8)
    w2 = torch.randint(0, 256, (E, dim, inter // 2), generator=g, dtype=torch.uint8)
    s2 = torch.randint(lo, hi, (E, dim, inter // FP4_GROUP), generator=g, dtype=torch.uint8)
    return tuple(t.to(device) for t in (w13, s13, w2, s2))


def pack_fp4(values, scale_bytes):
    """The inverse of dequant_fp4 for values on the e2m1 grid times their scale: (packed bytes, scale bytes)."""
    scale = torch.ldexp(torch.ones(scale_bytes.shape), scale_bytes.to(torch.int32) - 127)
    unit = (values.unflatten(-1, (-1, FP4_GROUP)) / scale[..., None]).flatten(-2)
    codes = torch.tensor([E2M1_CODES[abs(v)] for v in unit.abs().flatten().tolist()]).view(unit.shape)
    codes = codes | (torch.signbit(unit).to(torch.int64) << 3)
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8), scale_bytes


def test_fp4_unpack_pack_round_trip_bit_for_bit():
    """Every byte value (both nibbles, −0 included) and a spread of scale bytes survive dequant_fp4 → pack."""
    g = torch.Generator().manual_seed(0)
    packed = torch.arange(256, dtype=torch.uint8).repeat(3, 1)[:, torch.randperm(256, generator=g)]  # [3, 256]
    scale_bytes = torch.randint(1, 255, (3, 512 // FP4_GROUP), generator=g, dtype=torch.uint8)
    values = dequant_fp4(packed, scale_bytes)
    assert values.shape == (3, 512) and values.dtype == torch.float32
    repacked, _ = pack_fp4(values, scale_bytes)
    assert torch.equal(repacked, packed)
    # the loader's decoding (model/weights.py) agrees: low nibble = even element; scale byte 127 = 1
    assert torch.equal(dequant_fp4(packed, torch.full_like(scale_bytes, 127)), _unpack_fp4(packed.view(torch.int8)))
    assert torch.equal(dequant_fp4(packed.view(torch.int8), scale_bytes.view(torch.int8)), values)


def check_fp4_against_fp64(got, x, weights, indices, w, limit, what):
    """got vs moe_fp4_ref in fp64 (the dequantized weights are exact in every dtype here)."""
    truth = moe_fp4_ref(x.double(), weights.double(), indices, *w, limit)
    same_dtype = moe_fp4_ref(x, weights, indices, *w, limit)
    err, ref_err = rel_err(got, truth), rel_err(same_dtype, truth)
    assert torch.isfinite(got).all(), f"{what}: non-finite output at {(~torch.isfinite(got)).nonzero()[:5].tolist()}"
    worst = (got.double() - truth).abs().flatten().argmax().item()
    assert err <= 2 * ref_err + 1e-6 and err <= TOL[x.dtype], (
        f"{what}: relative error {err:.3g} (reference in {x.dtype}: {ref_err:.3g}); worst [t, d] = "
        f"{divmod(worst, got.shape[1])}: got {got.flatten()[worst].item()}, want {truth.flatten()[worst].item()}")


FP4_SMALL = dict(E=8, dim=64, inter=96)  # inter 96 = 3 scale groups: masked K tails at block_k 64 and 128
FP4_CONFIGS = [MoEConfig(16, 32, 32), MoEConfig(32, 16, 64, num_warps=2), MoEConfig(16, 64, 128),
               MoEConfig(16, 32, 64, fp4_unpack="bits")]


@pytest.mark.parametrize("routing", ["topk", "hash"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T", [1, 3, 17])
def test_fp4_matches_reference(T, dtype, routing, device):
    """fp16 x goes through tl.dot_scaled (but the last config), fp32 x through the kernels' own unpacking."""
    cfg = get_preset("tiny")
    seed = 100 + T * 10 + (routing == "hash")
    x, weights, indices = make_routing(seed, T, cfg, routing, device)
    w = make_fp4_weights(seed, FP4_SMALL["E"], cfg.dim, FP4_SMALL["inter"], device)
    x = x.to(dtype)
    for config in FP4_CONFIGS[T % 2::2]:
        out = torch.full((T, indices.shape[1], cfg.dim), float("nan"), device=device)
        y = moe_fp4(x, weights, indices, *w, cfg.swiglu_limit, out=out, backend="triton", config=config)
        assert (~torch.isfinite(out)).any(-1).nonzero().numel() == 0, "(token, slot) rows left unwritten"
        check_fp4_against_fp64(y, x, weights, indices, w, cfg.swiglu_limit,
                               f"seed={seed} T={T} {dtype} {routing} {config}")


@pytest.mark.parametrize("config", [c for _, c in _FP4_CONFIG_TABLE]
                         + [dataclasses.replace(_FP4_CONFIG_TABLE[0][1], block_n=n) for n in _FP4_DECODE_BLOCK_N])
def test_fp4_default_table_configs(config, device):
    """Every row of the FP4 launch table (and the decode row's narrowed tiles), as the GPU runs them, at small
    shapes with fp16 x (tl.dot_scaled) and both unpackings the interpreter can run."""
    cfg = get_preset("tiny")
    T = 9
    x, weights, indices = make_routing(200 + config.block_n, T, cfg, "topk", device)
    w = make_fp4_weights(200, FP4_SMALL["E"], cfg.dim, FP4_SMALL["inter"], device)
    for unpack in ("dot_scaled", "bits"):
        c = dataclasses.replace(config, fp4_unpack=unpack)
        y = moe_fp4(x.half(), weights, indices, *w, cfg.swiglu_limit, backend="triton", config=c)
        check_fp4_against_fp64(y, x.half(), weights, indices, w, cfg.swiglu_limit, f"{c}")


@pytest.mark.parametrize("config", [MoEConfig(16, 16, 128, 2, 4), MoEConfig(16, 32, 128, 2, 4, max_regs=128),
                                    MoEConfig(16, 16, 256, 2, 3, max_regs=128)])
def test_fp4_decode_sweep_candidates(config, device):
    """The decode candidates bench_quant.py --sweep adds (16-wide N tiles, a register cap) at small shapes: fresh
    inputs, a NaN-poisoned per-slot output fully written, within the fp64 bound, through both unpackings the
    interpreter runs (fp16 x: tl.dot_scaled; fp32 x: the kernels' bits)."""
    cfg = get_preset("tiny")
    T = 5
    for dtype, unpack in ((torch.float16, "dot_scaled"), (torch.float32, "bits")):
        seed = 300 + config.block_n + config.block_k + config.max_regs
        x, weights, indices = make_routing(seed, T, cfg, "topk", device)
        w = make_fp4_weights(seed, FP4_SMALL["E"], cfg.dim, FP4_SMALL["inter"], device)
        c = dataclasses.replace(config, fp4_unpack=unpack)
        out = torch.full((T, indices.shape[1], cfg.dim), float("nan"), device=device)
        y = moe_fp4(x.to(dtype), weights, indices, *w, cfg.swiglu_limit, out=out, backend="triton", config=c)
        assert (~torch.isfinite(out)).any(-1).nonzero().numel() == 0, f"{c}: (token, slot) rows left unwritten"
        check_fp4_against_fp64(y, x.to(dtype), weights, indices, w, cfg.swiglu_limit, f"seed={seed} {c}")


@pytest.mark.parametrize("dtype, arch", [(torch.float16, None), (torch.bfloat16, "gfx950")])
def test_fp4_decode_tile_narrows_to_fill_the_gpu(dtype, arch):
    one_token = default_moe_fp4_config(6, 256, dtype, arch, inter=2048, num_sms=132)
    assert one_token.block_n == 32, "6 experts × 2048/64 = 192 programs leave 132 SMs short"
    assert default_moe_fp4_config(48, 256, dtype, arch, inter=2048, num_sms=132).block_n == 64
    assert default_moe_fp4_config(6, 256, dtype, arch).block_n == _FP4_CONFIG_TABLE[0][1].block_n
    assert one_token.fp4_unpack == "dot_scaled"


def test_fp4_decode_on_nvidia_with_bf16_takes_the_ptx_unpack():
    """bf16 x on an NVIDIA GPU (SMs known, no AMD arch): the PTX unpack on 32-wide N tiles at every decode size;
    prefill tiles, AMD, fp16 and the CPU (no SMs) keep dot_scaled."""
    for pairs in (6, 48, 64 * 6):
        c = default_moe_fp4_config(pairs, 256, torch.bfloat16, inter=2048, num_sms=132)
        assert (c.fp4_unpack, c.block_n, c.block_m) == ("ptx", 32, 16)
    assert default_moe_fp4_config(8192 * 6, 256, torch.bfloat16, inter=2048, num_sms=132).fp4_unpack == "dot_scaled"
    assert default_moe_fp4_config(6, 256, torch.bfloat16, "gfx942", inter=2048, num_sms=304).fp4_unpack == "dot_scaled"
    assert default_moe_fp4_config(6, 256, torch.bfloat16).fp4_unpack == "dot_scaled"


@pytest.mark.parametrize("limit", [10.0, 0.0])
def test_fp4_swiglu_clamp_and_skewed_groups(limit, device):
    """Scales 2^6 larger push gate/up past the limit; all 40 tokens on two experts (groups over many blocks)."""
    T, dim, inter = 40, 64, 96
    g = torch.Generator().manual_seed(9)
    x = torch.randn(T, dim, generator=g).to(device)
    indices = torch.tensor([[3, 5]] * T, device=device)
    weights = torch.rand(T, 2, generator=g).to(device)
    w = make_fp4_weights(9, 8, dim, inter, device, scale_bytes=(124, 130))
    truth = moe_fp4_ref(x.double(), weights.double(), indices, *w, limit)
    if limit > 0:
        free = moe_fp4_ref(x.double(), weights.double(), indices, *w, 0.0)
        assert rel_err(truth, free) > 0.1, "the clamp does not change the result: the test would not see it"
    for config in (FP4_CONFIGS[0], FP4_CONFIGS[3]):
        y = moe_fp4(x.half(), weights, indices, *w, limit, backend="triton", config=config)
        check_fp4_against_fp64(y, x.half(), weights, indices, w, limit, f"limit={limit} {config}")


def test_fp4_bad_inputs_are_refused():
    x = torch.zeros(3, 64)
    w13, s13, w2, s2 = make_fp4_weights(0, 8, 64, 96, "cpu")
    idx, wts = torch.zeros(3, 2, dtype=torch.int64), torch.zeros(3, 2)
    with pytest.raises(ValueError, match="w13_scale|scale"):
        moe_fp4(x, wts, idx, w13, s13[..., :1], w2, s2, 10.0)
    with pytest.raises(ValueError, match="w2 must be packed"):
        moe_fp4(x, wts, idx, w13, s13, w2[:, :, :32], s2[:, :, :2], 10.0)
    with pytest.raises(TypeError, match="uint8"):
        moe_fp4(x, wts, idx, w13.float(), s13, w2, s2, 10.0)
    with pytest.raises(ValueError, match="block_k >= 32"):
        moe_fp4(x, wts, idx, w13, s13, w2, s2, 10.0, backend="triton", config=MoEConfig(16, 32, 16))
    with pytest.raises(ValueError, match="max_regs"):
        moe_fp4(x, wts, idx, w13, s13, w2, s2, 10.0, backend="triton", config=MoEConfig(16, 32, 32, max_regs=16))


@needs_gpu
@pytest.mark.parametrize("preset, E", [("bench", None), ("v4-flash", 32)])  # V4-Flash's expert dims, 32 experts
@pytest.mark.parametrize("T", [1, 64, 256, 2048])  # 2048: the prefill tiles
@pytest.mark.parametrize("unpack", ["dot_scaled", "bits", "ptx"])
def test_fp4_gpu_bf16(T, preset, E, unpack):
    cfg = get_preset(preset)
    if E is not None:
        cfg = get_preset(preset, n_routed_experts=E)
    seed = T + (E or 0)
    x, weights, indices = make_routing(seed, T, cfg, "topk", "cuda")
    w = make_fp4_weights(seed, cfg.n_routed_experts, cfg.dim, cfg.moe_inter_dim, "cuda", scale_bytes=(119, 125))
    x = x.to(torch.bfloat16)
    config = default_moe_fp4_config(T * cfg.n_activated_experts, cfg.n_routed_experts, x.dtype)
    config = dataclasses.replace(config, fp4_unpack=unpack)
    fmt = _weight_format(True, x, config)  # the PTX unpack serves decode tiles only; wider ones take dot_scaled
    assert fmt == {"dot_scaled": 2, "bits": 1, "ptx": 3 if config.block_m <= PTX_MAX_BLOCK_M else 2}[unpack]
    out = torch.full((T, cfg.n_activated_experts, cfg.dim), float("nan"), device="cuda")
    y = moe_fp4(x, weights, indices, *w, cfg.swiglu_limit, out=out, config=config)
    assert (~torch.isfinite(out)).any(-1).nonzero().numel() == 0, "(token, slot) rows left unwritten"
    check_fp4_against_fp64(y, x, weights, indices, w, cfg.swiglu_limit, f"{preset} E={E} T={T} {config}")


def _run_ptx(asm: str, regs: dict[str, int]) -> dict[str, int]:
    """A tiny interpreter of the PTX subset `_E2M1_BF16_PTX` uses (mov, and, or, shl, shr, prmt, fma.rn.bf16x2) on
    32-bit registers; operands $i are read from / written to regs."""
    def val(tok):
        tok = tok.strip()
        return int(tok, 0) if tok[0].isdigit() else regs[tok]

    def bf16x2(v):
        return torch.tensor([v & 0xFFFF, v >> 16], dtype=torch.int32).to(torch.int16).view(torch.bfloat16).double()

    for stmt in asm.replace("{", "").replace("}", "").split(";"):
        stmt = stmt.strip()
        if not stmt or stmt.startswith(".reg"):
            continue
        op, args = stmt.split(None, 1)
        dst, *src = [a.strip() for a in args.split(",")]
        v = [val(a) for a in src]
        if op == "mov.b32":
            out = v[0]
        elif op == "and.b32":
            out = v[0] & v[1]
        elif op == "or.b32":
            out = v[0] | v[1]
        elif op == "shl.b32":
            out = (v[0] << v[1]) & 0xFFFFFFFF
        elif op == "shr.b32":
            out = v[0] >> v[1]
        elif op == "prmt.b32":
            pool = v[0] | (v[1] << 32)
            out = 0
            for i in range(4):
                nib = (v[2] >> (4 * i)) & 0xF
                byte = (pool >> (8 * (nib & 7))) & 0xFF
                if nib & 8:
                    byte = 0xFF if byte & 0x80 else 0
                out |= byte << (8 * i)
        elif op == "fma.rn.bf16x2":
            r = (bf16x2(v[0]) * bf16x2(v[1]) + bf16x2(v[2])).to(torch.bfloat16).view(torch.int16).to(torch.int32)
            out = (int(r[0]) & 0xFFFF) | ((int(r[1]) & 0xFFFF) << 16)
        else:
            raise AssertionError(f"unexpected instruction {op}")
        regs[dst] = out
    return regs


def test_fp4_ptx_unpack_matches_dequant_with_a_scale_per_byte():
    """The bf16 PTX unpacking, emulated: every byte value, each of the 4 packed bytes with its own scale (pack=4 may
    group bytes of different 32-input groups or rows), against dequant_fp4."""
    from sparsepd.kernels.moe import _E2M1_BF16_PTX
    g = torch.Generator().manual_seed(3)
    every = torch.arange(256, dtype=torch.uint8)
    scale_bytes = torch.randint(100, 150, (256,), generator=g, dtype=torch.uint8)
    lo_want = torch.tensor([_E2M1[b & 0xF] for b in range(256)], dtype=torch.float64)
    hi_want = torch.tensor([_E2M1[b >> 4] for b in range(256)], dtype=torch.float64)
    scale = torch.ldexp(torch.ones(256, dtype=torch.float64), scale_bytes.to(torch.int32) - 127)
    s16 = (scale_bytes.to(torch.int32) << 7)
    for first in range(0, 256, 4):
        idx = [(first + i * 67) % 256 for i in range(4)]  # 4 different bytes and scales
        b = sum(int(every[j]) << (8 * i) for i, j in enumerate(idx))
        regs = {"$4": b, "$5": int(s16[idx[0]]) | (int(s16[idx[1]]) << 16),
                "$6": int(s16[idx[2]]) | (int(s16[idx[3]]) << 16)}
        regs = _run_ptx(str(_E2M1_BF16_PTX.value), regs)
        halves = [(regs[f"${r}"] >> (16 * h)) & 0xFFFF for r in range(4) for h in range(2)]
        got = torch.tensor(halves, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).double()
        lo, hi = got[:4], got[4:]  # outputs: lo = $0, $1 (bytes 0-3), hi = $2, $3
        assert torch.equal(lo, lo_want[idx] * scale[idx]), f"low nibbles of bytes {idx}: {lo.tolist()}"
        assert torch.equal(hi, hi_want[idx] * scale[idx]), f"high nibbles of bytes {idx}"
