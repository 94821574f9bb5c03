"""kernels/sparse_attention.py: the Triton kernels against an fp64 reference.

On CPU the kernels run in the Triton interpreter at small shapes with fp16/fp32 inputs (the interpreter
has no bf16 dot); with SPARSEPD_TEST_GPU=1 the same tests also run bf16 at the model's real shapes.
"""

import dataclasses
import math
import os

import pytest
import torch

from sparsepd.kernels.sparse_attention import (
    SparseAttnConfig,
    default_config,
    merge_attn,
    merge_attn_ref,
    sparse_attn,
    sparse_attn_ref,
)

ON_GPU = os.environ.get("SPARSEPD_TEST_GPU") == "1"

# Relative error bounds vs fp64 (norm-wise over the tensor); per (token, head) row the out bound is 5×.
OUT_TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}
LSE_TOL = {torch.bfloat16: 1e-3, torch.float16: 1e-5, torch.float32: 1e-6}


def make_inputs(seed, T, H, D, K, dtype, device, pad_frac=0.3, dup=False):
    """q, kv, indices, attn_sink with padding anywhere, one all-padding row and one single-key row."""
    g = torch.Generator().manual_seed(seed)
    R = 2 * K + 13
    q = (2.0 * torch.randn(T, H, D, generator=g)).to(dtype)
    kv = torch.randn(R, D, generator=g).to(dtype)
    idx = torch.stack([torch.randperm(R, generator=g)[:K] for _ in range(T)]).to(torch.int32)  # [T, K]
    idx[torch.rand(T, K, generator=g) < pad_frac] = -1
    if dup and K >= 4:
        idx[:, 1] = idx[:, 3].clamp(min=0)  # a repeated row counts twice
    if T >= 2:
        idx[0] = -1
        idx[1] = -1
        idx[1, torch.randint(0, K, (1,), generator=g)] = 7
    idx[-1, 0] = R - 1  # at least one valid key somewhere
    sink = 2.0 * torch.randn(H, generator=g)
    sink[0] = 8.0  # a sink that dominates its head
    if H > 1:
        sink[1] = float("-inf")  # a head without a sink: plain softmax
    return q.to(device), kv.to(device), idx.to(device), sink.to(device)


def fp64_reference(q, kv, idx, sink, scale):
    return sparse_attn_ref(q.double(), kv.double(), idx, sink.double(), scale)


def assert_close(out, lse, ref_out, ref_lse, dtype, ctx):
    out, lse, ref_out, ref_lse = out.cpu().double(), lse.cpu().double(), ref_out.cpu(), ref_lse.cpu()
    assert not torch.isnan(out).any() and not torch.isnan(lse).any(), f"NaN in the result ({ctx})"
    assert torch.isfinite(out).all(), f"inf in out ({ctx})"
    empty = torch.isneginf(ref_lse)
    bad = (torch.isneginf(lse) != empty).nonzero().tolist()
    assert not bad, f"lse is -inf exactly where no key is valid; wrong at [t, h] {bad[:5]} ({ctx})"
    assert (out[empty] == 0).all(), f"rows without keys must be 0 ({ctx})"
    rel_out = ((out - ref_out).norm() / ref_out.norm()).item()
    assert rel_out <= OUT_TOL[dtype], f"out rel err {rel_out:.2e} > {OUT_TOL[dtype]:.0e} ({ctx})"
    row_err = (out - ref_out).norm(dim=-1) / ref_out.norm(dim=-1).clamp(min=1e-30)
    row_err[empty] = 0
    worst = divmod(int(row_err.argmax()), row_err.shape[1])
    assert row_err.max() <= 5 * OUT_TOL[dtype], f"row rel err {row_err.max():.2e} at [t, h]={worst} ({ctx})"
    fin = ~empty
    rel_lse = ((lse[fin] - ref_lse[fin]).norm() / ref_lse[fin].norm()).item()
    assert rel_lse <= LSE_TOL[dtype], f"lse rel err {rel_lse:.2e} > {LSE_TOL[dtype]:.0e} ({ctx})"


def poisoned(q, H):
    T, _, D = q.shape
    out = torch.full((T, H, D), float("nan"), dtype=q.dtype, device=q.device)
    lse = torch.full((T, H), float("nan"), dtype=torch.float32, device=q.device)
    return out, lse


# (T, H, D, K, dtype, config or None for the default table)
CPU_CASES = [
    (3, 16, 64, 40, torch.float16, None),
    (2, 20, 48, 33, torch.float32, None),  # H not a multiple of the block, D not a power of two
    (2, 16, 512, 24, torch.float16, None),  # the model's head_dim
    (3, 20, 64, 70, torch.float16, SparseAttnConfig(16, 16, 3, 4, 2)),  # split keys, merged by LSE
    (4, 33, 32, 50, torch.float32, SparseAttnConfig(32, 16, 2, 4, 2)),
    (1, 16, 32, 1, torch.float32, None),  # K = 1
    (3, 20, 64, 70, torch.float16, SparseAttnConfig(16, 32, 2, 4, 2, skip_empty=False)),
]
GPU_CASES = [
    (1, 16, 512, 1152, torch.bfloat16, None),
    (1, 64, 512, 1152, torch.bfloat16, None),
    (1, 128, 512, 640, torch.bfloat16, None),
    (37, 64, 512, 1152, torch.bfloat16, None),
    (64, 128, 512, 1152, torch.bfloat16, None),
    (200, 16, 512, 1152, torch.bfloat16, None),
    (300, 64, 512, 640, torch.bfloat16, None),
    (5, 20, 512, 300, torch.bfloat16, None),
    (9, 64, 512, 1152, torch.bfloat16, SparseAttnConfig(16, 32, 1, 4, 4)),
    (9, 64, 512, 1152, torch.bfloat16, SparseAttnConfig(32, 32, 5, 8, 3)),
    (9, 64, 512, 1152, torch.bfloat16, SparseAttnConfig(64, 16, 7, 8, 4)),
    (40, 64, 512, 1152, torch.bfloat16, SparseAttnConfig(64, 32, 1, 8, 3, skip_empty=False)),
    (40, 64, 512, 1152, torch.bfloat16, SparseAttnConfig(64, 32, 2, 8, 4, skip_empty=True)),
    (17, 128, 512, 1152, torch.bfloat16, SparseAttnConfig(64, 64, 1, 8, 2, skip_empty=True)),
    (17, 128, 512, 1152, torch.bfloat16, SparseAttnConfig(64, 64, 3, 8, 2, skip_empty=False)),
    (17, 64, 512, 1152, torch.bfloat16, SparseAttnConfig(16, 64, 1, 4, 3, skip_empty=False)),
    (17, 64, 512, 1152, torch.bfloat16, SparseAttnConfig(32, 32, 2, 8, 3, skip_empty=True)),
    (33, 128, 512, 1152, torch.float16, None),
    (7, 64, 512, 300, torch.float32, SparseAttnConfig(16, 16, 1, 4, 2)),
]
CASES = CPU_CASES + (GPU_CASES if ON_GPU else [])


@pytest.mark.parametrize("case", range(len(CASES)))
def test_sparse_attn_matches_fp64(device, case):
    T, H, D, K, dtype, config = CASES[case]
    seed = 1000 + case
    q, kv, idx, sink = make_inputs(seed, T, H, D, K, dtype, device, dup=case % 2 == 1)
    scale = D ** -0.5
    out, lse = poisoned(q, H)
    res = sparse_attn(q, kv, idx, sink, scale, out, lse, backend="triton", config=config)
    assert res[0] is out and res[1] is lse
    ref_out, ref_lse = fp64_reference(q, kv, idx, sink, scale)
    assert_close(out, lse, ref_out, ref_lse, dtype, f"seed={seed} T={T} H={H} D={D} K={K} {dtype} {config}")


def test_sparse_attn_strided_q_and_out(device):
    T, H, D, K = 3, 20, 64, 37
    q, kv, idx, sink = make_inputs(7, T, H, D, K, torch.float16, device)
    q_wide = torch.randn(T, H, 2 * D, device=device).to(q.dtype)
    q_wide[..., D:] = q
    out_wide = torch.full((T, H, 3 * D), float("nan"), dtype=q.dtype, device=device)
    out, lse = sparse_attn(q_wide[..., D:], kv, idx, sink, 0.1, out_wide[..., D:2 * D], backend="triton")
    ref_out, ref_lse = fp64_reference(q, kv, idx, sink, 0.1)
    assert_close(out, lse, ref_out, ref_lse, q.dtype, "strided")
    assert torch.isnan(out_wide[..., :D]).all() and torch.isnan(out_wide[..., 2 * D:]).all()


def test_sparse_attn_no_valid_key_anywhere(device):
    q, kv, idx, sink = make_inputs(3, 2, 16, 32, 20, torch.float32, device)
    idx.fill_(-1)
    out, lse = poisoned(q, 16)
    for config in (None, SparseAttnConfig(16, 16, 2, 4, 2)):
        sparse_attn(q, kv, idx, sink, 0.2, out, lse, backend="triton", config=config)
        assert (out == 0).all() and torch.isneginf(lse).all()


@pytest.mark.parametrize("splits, skip_empty", [(1, True), (4, True), (4, False)])
def test_sparse_attn_padding_at_the_ends(device, splits, skip_empty):
    """Leading and trailing padding: whole splits without a key, a last key at the very end."""
    T, H, D, K = 4, 16, 32, 96
    q, kv, idx, sink = make_inputs(8, T, H, D, K, torch.float32, device, pad_frac=0.0)
    idx[0, 5:] = -1  # keys only at the start: later splits are empty
    idx[1, :-1] = -1  # one key, the last one
    idx[2, :40] = -1  # keys only at the end
    idx[3, 30:70] = -1  # a hole in the middle
    out, lse = poisoned(q, H)
    config = SparseAttnConfig(16, 16, splits, 4, 2, skip_empty)
    sparse_attn(q, kv, idx, sink, 0.2, out, lse, backend="triton", config=config)
    ref_out, ref_lse = fp64_reference(q, kv, idx, sink, 0.2)
    assert_close(out, lse, ref_out, ref_lse, torch.float32, f"padding at the ends, {splits} splits")


def test_triton_skips_indices_past_the_pool(device):
    q, kv, idx, sink = make_inputs(4, 3, 16, 32, 24, torch.float32, device)
    bad = idx.clone()
    bad[:, ::5] = kv.shape[0] + 3
    out, lse = sparse_attn(q, kv, bad, sink, 0.2, backend="triton")
    ref_out, ref_lse = fp64_reference(q, kv, torch.where(bad >= kv.shape[0], -1, bad), sink, 0.2)
    assert_close(out, lse, ref_out, ref_lse, torch.float32, "indices >= R")
    with pytest.raises(ValueError, match="indices must be < R"):
        sparse_attn_ref(q, kv, bad, sink, 0.2)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_merge_attn_equals_one_shot(device, backend):
    T, H, D, K = (33, 64, 512, 1152) if ON_GPU else (4, 20, 64, 40)
    dtype = torch.bfloat16 if ON_GPU else torch.float16
    q, kv, idx, sink = make_inputs(11, T, H, D, K, dtype, device)
    g = torch.Generator().manual_seed(12)
    in_a = (torch.rand(T, K, generator=g) < 0.4).to(device)
    in_a[2] = True  # token 2: every key in A, B empty
    idx_a, idx_b = torch.where(in_a, idx, -1), torch.where(in_a, -1, idx)
    out_a, lse_a = sparse_attn(q, kv, idx_a, sink, D ** -0.5, backend="triton")
    out_b, lse_b = sparse_attn(q, kv, idx_b, sink, D ** -0.5, backend="triton")
    out, lse = poisoned(q, H)
    merge_attn(out_a, lse_a, out_b, lse_b, sink, out, lse, backend=backend)
    ref_out, ref_lse = fp64_reference(q, kv, idx, sink, D ** -0.5)
    assert_close(out, lse, ref_out, ref_lse, dtype, f"merge {backend}")


def test_merge_attn_triton_matches_reference_on_fp32(device):
    g = torch.Generator().manual_seed(5)
    T, H, D = 5, 19, 40
    out_a, out_b = torch.randn(2, T, H, D, generator=g).to(device).unbind(0)
    lse_a, lse_b = (3 * torch.randn(2, T, H, generator=g)).to(device).unbind(0)
    lse_a[0], lse_b[0:2] = float("-inf"), float("-inf")
    out_a[0], out_b[0:2] = 0, 0
    sink = torch.randn(H, generator=g).to(device)
    sink[3] = float("-inf")
    out, lse = merge_attn(out_a, lse_a, out_b, lse_b, sink, backend="triton")
    ref_out, ref_lse = merge_attn_ref(out_a.double(), lse_a.double(), out_b.double(), lse_b.double(), sink.double())
    assert torch.isneginf(lse[0]).all() and (out[0] == 0).all()
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert ((out.double() - ref_out).norm() / ref_out.norm()) < 1e-6
    fin = ~torch.isneginf(ref_lse)
    assert torch.equal(~torch.isneginf(lse), fin)
    assert ((lse.double() - ref_lse)[fin].norm() / ref_lse[fin].norm()) < 1e-6


# ---------------------------------------------------------------------------------------------------
# The reference itself, dispatch and input checks (CPU only: they test no kernel)


def loop_reference(q, kv, idx, sink, scale):
    """The formula written out one (token, head) at a time, in fp64."""
    T, H, D = q.shape
    out = torch.zeros(T, H, D, dtype=torch.float64)
    lse = torch.full((T, H), float("-inf"), dtype=torch.float64)
    for t in range(T):
        keys = [int(j) for j in idx[t] if j >= 0]
        for h in range(H):
            if not keys:
                continue
            s = torch.stack([scale * q[t, h].double() @ kv[j].double() for j in keys])
            num = sum(math.exp(s[i]) * kv[j].double() for i, j in enumerate(keys))
            out[t, h] = num / (torch.exp(s).sum() + math.exp(sink[h]))
            lse[t, h] = torch.logsumexp(s, 0)
    return out, lse


def test_reference_matches_the_formula():
    q, kv, idx, sink = make_inputs(21, 4, 3, 8, 6, torch.float64, "cpu", dup=True)
    sink[1] = -1.5  # math.exp(-inf) is fine, but keep one finite sink per head for this check
    out, lse = sparse_attn_ref(q, kv, idx, sink, 0.4)
    want_out, want_lse = loop_reference(q, kv, idx, sink, 0.4)
    assert torch.allclose(out, want_out, rtol=1e-12, atol=1e-14)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(want_lse))
    fin = ~torch.isneginf(lse)
    assert torch.allclose(lse[fin], want_lse[fin], rtol=1e-12)


def test_reference_float32_in_float32_out():
    q, kv, idx, sink = make_inputs(22, 5, 4, 32, 30, torch.float32, "cpu")
    out, lse = sparse_attn_ref(q, kv, idx, sink, 0.2)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    ref_out, ref_lse = fp64_reference(q, kv, idx, sink, 0.2)
    assert_close(out, lse, ref_out, ref_lse, torch.float32, "reference fp32")
    empty_out, empty_lse = sparse_attn_ref(q, kv, idx[:, :0], sink, 0.2)  # K = 0
    assert (empty_out == 0).all() and torch.isneginf(empty_lse).all()


def test_auto_backend_on_cpu_is_the_reference():
    q, kv, idx, sink = make_inputs(23, 3, 4, 16, 10, torch.float32, "cpu")
    got = sparse_attn(q, kv, idx, sink, 0.3)
    want = sparse_attn_ref(q, kv, idx, sink, 0.3)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_default_config_follows_the_measured_table():
    """The H100 decisions of bench/RESULTS.md: split small batches, 64-head tiles once a wave is full."""
    one = default_config(1, 64, 1152, 512, 132)
    assert (one.block_h, one.num_splits) == (16, 36)  # T = 1: 32-key splits
    mid = default_config(32, 64, 1152, 512, 132)
    assert (mid.block_h, mid.block_n, mid.num_splits) == (16, 64, 1)
    big = default_config(256, 128, 1152, 512, 132)
    assert (big.block_h, big.num_splits, big.num_warps, big.skip_empty) == (64, 1, 8, True)
    for T in (1, 8, 64, 256):
        for H in (16, 20, 64, 128):
            assert default_config(T, H, 1152, 512, 132).block_h >= 16  # tl.dot tiles ≥ 16 rows


def test_fp8_rows_keep_the_grid_with_8_warps_and_shorter_key_steps():
    """FP8 KV rows on NVIDIA: the bf16 rows' head blocks and splits (the same grid), 8 warps, 32-key steps and 4
    stages on 16-head blocks, 16-key steps and 5 stages on 64-head blocks: the tiles that compile for sm_90 without
    spills (test_sparse_attention_smem.py compiles them)."""
    for T in (1, 2, 8, 32, 64, 128, 256, 8192):
        for H in (16, 64, 128):
            for K in (640, 1152):
                bf16 = default_config(T, H, K, 512, 132)
                fp8 = default_config(T, H, K, 512, 132, fp8_rows=True)
                ctx = f"T={T} H={H} K={K}: {bf16} / {fp8}"
                assert (fp8.block_h, fp8.num_splits, fp8.skip_empty) == (bf16.block_h, bf16.num_splits,
                                                                         bf16.skip_empty), ctx
                want = (32, 8, 4) if fp8.block_h == 16 else (16, 8, 5)
                assert (fp8.block_n, fp8.num_warps, fp8.num_stages) == want, ctx
    assert default_config(32, 64, 1152, 512, 132, fp8_rows=True) == SparseAttnConfig(16, 32, 1, 8, 4, False)
    for arch in ("gfx950", "gfx942"):  # AMD keeps its own compile-checked rows
        assert default_config(32, 64, 1152, 512, 256, arch, fp8_rows=True).num_warps == 4


@pytest.mark.parametrize(
    "change, error",
    [
        (lambda a: a.update(q=a["q"][0]), "q must have 3 dims"),
        (lambda a: a.update(kv=a["kv"][:, :8]), "kv must be"),
        (lambda a: a.update(indices=a["indices"].long()), "indices must be int32"),
        (lambda a: a.update(indices=a["indices"][:1]), "indices must be"),
        (lambda a: a.update(attn_sink=a["attn_sink"][:2]), "attn_sink must be"),
        (lambda a: a.update(kv=a["kv"].half()), "q and kv must share a dtype"),
        (lambda a: a.update(scale=float("nan")), "scale must be a finite float"),
        (lambda a: a.update(out=torch.empty(1)), "out must be"),
        (lambda a: a.update(q=a["q"].double(), kv=a["kv"].double()), "q and kv must share a dtype"),
    ],
)
def test_bad_inputs_are_rejected(change, error):
    q, kv, idx, sink = make_inputs(24, 2, 4, 16, 10, torch.float32, "cpu")
    args = dict(q=q, kv=kv, indices=idx, attn_sink=sink, scale=0.25)
    change(args)
    with pytest.raises((ValueError, TypeError), match=error):
        sparse_attn(**args, backend="reference")


def test_triton_path_rejects_unsupported_layouts(device):
    q, kv, idx, sink = make_inputs(25, 2, 4, 16, 10, torch.float32, device)
    with pytest.raises(ValueError, match="contiguous in its last dim"):
        sparse_attn(q, kv.t().contiguous().t(), idx, sink, 0.25, backend="triton")
    with pytest.raises(ValueError, match="16 <= D <= 512"):
        sparse_attn(q[..., :8].contiguous(), kv[:, :8].contiguous(), idx, sink, 0.25, backend="triton")
    with pytest.raises(ValueError, match="power of two in"):
        sparse_attn(q, kv, idx, sink, 0.25, backend="triton", config=SparseAttnConfig(8, 16, 1, 4, 2))


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
def test_sparse_attn_replays_in_a_cuda_graph(device):
    T, H, D, K = 4, 64, 512, 1152
    q, kv, idx, sink = make_inputs(31, T, H, D, K, torch.bfloat16, device)
    out, lse = sparse_attn(q, kv, idx, sink, D ** -0.5)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        g_out, g_lse = sparse_attn(q, kv, idx, sink, D ** -0.5)
    q2, kv2, idx2, _ = make_inputs(32, T, H, D, K, torch.bfloat16, device)
    q.copy_(q2), kv.copy_(kv2), idx.copy_(idx2)
    graph.replay()
    torch.cuda.synchronize()
    ref_out, ref_lse = fp64_reference(q, kv, idx, sink, D ** -0.5)
    assert_close(g_out, g_lse, ref_out, ref_lse, torch.bfloat16, "graph replay")


# (T, H, D, K, dtype, config): split launches merged by the last program of each head block (one launch)
FUSED_CASES = [
    (3, 20, 64, 70, torch.float16, SparseAttnConfig(16, 16, 3, 4, 2, fused_merge=True)),
    (1, 33, 32, 90, torch.float32, SparseAttnConfig(32, 16, 6, 4, 2, fused_merge=True)),  # T = 1, masked heads
    (2, 16, 96, 50, torch.float32, SparseAttnConfig(16, 16, 4, 4, 2, skip_empty=False, fused_merge=True)),
    # 13 splits merged 4 at a time (_merge_unroll at D = 64): full groups, then a part-masked one
    (2, 16, 64, 400, torch.float32, SparseAttnConfig(16, 16, 13, 4, 2, fused_merge=True)),
] + ([(1, 64, 512, 1152, torch.bfloat16, SparseAttnConfig(16, 32, 36, 4, 3, fused_merge=True)),
      (1, 128, 512, 640, torch.bfloat16, SparseAttnConfig(16, 32, 20, 4, 3, fused_merge=True)),
      (8, 64, 512, 1152, torch.bfloat16, SparseAttnConfig(16, 32, 8, 4, 3, fused_merge=True))] if ON_GPU else [])


@pytest.mark.parametrize("case", range(len(FUSED_CASES)))
def test_fused_merge_matches_fp64_and_leaves_tickets_zero(device, case):
    T, H, D, K, dtype, config = FUSED_CASES[case]
    tickets = torch.zeros(T * -(-H // config.block_h), dtype=torch.int32, device=device)
    for rep in range(2):  # the tickets the first launch leaves serve the second
        seed = 2000 + 10 * case + rep
        q, kv, idx, sink = make_inputs(seed, T, H, D, K, dtype, device)
        out, lse = poisoned(q, H)
        sparse_attn(q, kv, idx, sink, D ** -0.5, out, lse, backend="triton", config=config, tickets=tickets)
        ref_out, ref_lse = fp64_reference(q, kv, idx, sink, D ** -0.5)
        assert_close(out, lse, ref_out, ref_lse, dtype, f"seed={seed} fused {config}")
        assert int(tickets.abs().sum()) == 0, "the merging programs must leave their tickets at 0"


def test_fit_shared_memory_drops_stages_then_key_steps():
    """The launch table's tiles are fitted to the card's shared memory by the model (checked against the compiler
    in test_sparse_attention_smem.py): fewer stages first, then shorter key steps, an error when nothing fits."""
    from sparsepd.kernels.kv_rows import KVRowLayout
    from sparsepd.kernels.sparse_attention import SM90_SMEM_BYTES, fit_shared_memory, smem_bytes
    layout = KVRowLayout(512, 64, torch.bfloat16)
    wide = SparseAttnConfig(16, 64, 1, 4, 4)
    assert smem_bytes(wide, 512, 2, layout) > SM90_SMEM_BYTES
    assert fit_shared_memory(wide, 512, 2, layout, SM90_SMEM_BYTES) == SparseAttnConfig(16, 64, 1, 4, 3)
    small = fit_shared_memory(wide, 512, 2, layout, 100 * 1024)
    assert (small.num_stages, small.block_n) == (2, 16) and smem_bytes(small, 512, 2, layout) <= 100 * 1024
    assert fit_shared_memory(wide, 512, 2, None, SM90_SMEM_BYTES) == wide  # bf16 rows: 4 stages fit
    with pytest.raises(ValueError, match="no sparse attention tile fits"):
        fit_shared_memory(wide, 512, 2, layout, 32 * 1024)
    for T in (1, 8, 32, 64, 128, 256, 8192):
        for H in (16, 64, 128):
            for fp8 in (False, True):
                c = default_config(T, H, 1152, 512, 132, fp8_rows=fp8)
                assert smem_bytes(c, 512, 2, layout if fp8 else None) <= SM90_SMEM_BYTES
    # a card with less shared memory (e.g. 100 KiB a block) gets smaller FP8-row tiles, never a failing launch
    c = default_config(32, 64, 1152, 512, 132, fp8_rows=True, smem_limit=100 * 1024)
    assert smem_bytes(c, 512, 2, layout) <= 100 * 1024 and c.block_n < 64


# (T, H, head_dim, rope, K, dtype, config): FP8 KV rows through the compact gather (rope ≤ 64, aligned scales) at
# the bf16 rows' tiles (64-key steps, 64-head tiles, splits) and at the NVIDIA table's FP8 tiles, and through the
# wide gather (rope dims > 64). fp16/fp32 in the interpreter (no bf16 dot there); bf16 at V4's shapes on the GPU.
FP8_CASES = [
    (3, 16, 512, 64, 150, torch.float16, SparseAttnConfig(16, 64, 1, 4, 3)),
    (2, 64, 512, 64, 90, torch.float16, SparseAttnConfig(64, 32, 1, 8, 3, skip_empty=True)),
    (2, 20, 192, 64, 100, torch.float16, SparseAttnConfig(16, 64, 3, 4, 3, fused_merge=True)),
    (3, 16, 96, 32, 70, torch.float32, SparseAttnConfig(16, 32, 2, 4, 2)),  # rope 32 inside the last chunk
    (2, 16, 256, 128, 40, torch.float16, SparseAttnConfig(16, 16, 1, 4, 2)),  # wide gather: rope 128
    # the NVIDIA FP8-row tiles of default_config: h16/n32/w8 unsplit, split with the fused merge, h64/n16/w8
    (3, 64, 512, 64, 150, torch.float16, SparseAttnConfig(16, 32, 1, 8, 4, skip_empty=False)),
    (1, 40, 512, 64, 200, torch.float32, SparseAttnConfig(16, 32, 6, 8, 4, skip_empty=False, fused_merge=True)),
    (2, 64, 512, 64, 90, torch.float16, SparseAttnConfig(64, 16, 1, 8, 5, skip_empty=True)),
] + ([(T, H, 512, 64, K, torch.bfloat16, None) for T, H, K in ((1, 64, 1152), (32, 64, 1152), (64, 128, 640),
                                                                (128, 16, 1152), (300, 64, 640))]
     if ON_GPU else [])


@pytest.mark.parametrize("case", range(len(FP8_CASES)))
def test_sparse_attn_over_fp8_rows_at_the_table_tiles(device, case):
    check_fp8_rows(device, 3000 + case, *FP8_CASES[case])


def check_fp8_rows(device, seed, T, H, D, rope, K, dtype, config):
    """sparse_attn over FP8 KV rows (fresh rows over 5 binades, poisoned outputs) against the fp64 reference on the
    dequantized rows."""
    from sparsepd.kernels.kv_rows import KVRowLayout, pack_kv_rows_ref, unpack_kv_rows
    from sparsepd.kernels.sparse_attention import _compact_rows
    layout = KVRowLayout(D, rope, dtype)
    assert _compact_rows(layout) == (rope <= 64)
    q, kv, idx, sink = make_inputs(seed, T, H, D, K, dtype, "cpu")
    g = torch.Generator().manual_seed(seed)
    kv = kv.float() * torch.exp2(torch.randint(0, 5, (kv.shape[0], 1), generator=g))  # rows over 5 binades
    rows = pack_kv_rows_ref(kv.to(dtype), layout)  # [R, row_bytes]
    # q / 16: scores of a few units, so no output of a sink-dominated head falls to fp16 subnormals
    q, rows, idx, sink = (x.to(device) for x in (q / 16, rows, idx, sink))
    out, lse = poisoned(q, H)
    tickets = torch.zeros(T * H, dtype=torch.int32, device=device)
    sparse_attn(q, rows, idx, sink, D ** -0.5, out, lse, kv_layout=layout, backend="triton", config=config,
                tickets=tickets)
    ref_out, ref_lse = sparse_attn_ref(q.double(), unpack_kv_rows(rows, layout).double(), idx, sink.double(),
                                       D ** -0.5)
    assert_close(out, lse, ref_out, ref_lse, dtype, f"seed={seed} T={T} H={H} D={D} rope={rope} K={K} {config}")
    assert int(tickets.abs().sum()) == 0


def test_fp8_rows_must_be_8_byte_aligned(device):
    """The compact gather reads each row's scale bytes as one int64 word: a misaligned kv is refused, not read."""
    from sparsepd.kernels.kv_rows import KVRowLayout, pack_kv_rows_ref
    layout = KVRowLayout(128, 64, torch.float16)
    q, kv, idx, sink = make_inputs(4100, 2, 16, 128, 20, torch.float16, "cpu")
    rows = pack_kv_rows_ref(kv, layout)
    raw = torch.empty(rows.numel() + 1, dtype=torch.uint8)
    shifted = raw[1:].view(rows.shape)  # the same bytes one byte off an 8-byte boundary
    shifted.copy_(rows)
    args = [x.to(device) for x in (q, shifted, idx, sink)]
    if args[1].data_ptr() % 8 == 0:  # a copy to the device realigns: place it off by one there
        raw = torch.empty(rows.numel() + 1, dtype=torch.uint8, device=device)
        args[1] = raw[1:].view(rows.shape)
        args[1].copy_(rows.to(device))
    with pytest.raises(ValueError, match="8-byte aligned"):
        sparse_attn(*args, 128 ** -0.5, kv_layout=layout, backend="triton")


# (T, H, head_dim, rope, K, dtype, config): the FP8 dequantization variants (SparseAttnConfig.dequant) at the FP8
# tiles: "cvt" (the FP8 conversion, the scale applied to the tile) on the compact and the wide gather, "cvt_chunks"
# (the scales out of the key tile: chunked dots) on compact rows, including a rope chunk of 32 dims and a BLOCK_D
# past D. The interpreter converts float8e4nv codes as the hardware does (NaN codes aside, which rows never hold).
# Stages are within sm_90's 227 KiB of shared memory for fp32 tiles at D = 512 (compiled for sm_90: 213,504 and
# 221,696 bytes at 3 stages; 4 and 5 stages asked 238,336 and 246,784 and did not launch on an H100).
DEQUANT_CASES = [
    (3, 16, 512, 64, 150, torch.float16, SparseAttnConfig(16, 32, 1, 8, 4, skip_empty=False, dequant="cvt")),
    (1, 40, 512, 64, 200, torch.float32, SparseAttnConfig(16, 32, 6, 8, 4, False, True, dequant="cvt")),
    (2, 16, 256, 128, 40, torch.float16, SparseAttnConfig(16, 16, 1, 4, 2, dequant="cvt")),  # wide gather
    (3, 16, 512, 64, 150, torch.float32, SparseAttnConfig(16, 32, 1, 8, 3, skip_empty=False, dequant="cvt_chunks")),
    (2, 64, 512, 64, 90, torch.float32, SparseAttnConfig(64, 16, 1, 8, 3, skip_empty=True, dequant="cvt_chunks")),
    (2, 20, 192, 64, 100, torch.float32, SparseAttnConfig(16, 64, 3, 4, 3, fused_merge=True, dequant="cvt_chunks")),
    (3, 16, 96, 32, 70, torch.float32, SparseAttnConfig(16, 32, 2, 4, 2, dequant="cvt_chunks")),
] + ([(T, H, 512, 64, K, torch.bfloat16, dataclasses.replace(default_config(T, H, K, 512, 132, fp8_rows=True),
                                                              dequant=mode))
      for mode in ("cvt", "cvt_chunks") for T, H, K in ((1, 64, 1152), (32, 64, 1152), (64, 128, 640),
                                                        (128, 16, 1152), (300, 64, 640))]
     if ON_GPU else [])


@pytest.mark.parametrize("case", range(len(DEQUANT_CASES)))
def test_sparse_attn_fp8_dequant_variants(device, case):
    check_fp8_rows(device, 3100 + case, *DEQUANT_CASES[case])


def test_cvt_chunks_cases_fit_sm90_shared_memory():
    """The "cvt_chunks" cases launch on an H100/H200: `smem_bytes` (within 2.5 KiB above the compiler for that
    variant at 16, 32 and 64 heads, bf16 and fp32 q; tests/kernels/test_sparse_attention_smem.py) is within the
    card's 227 KiB. Two fp32 cases at 4 and 5 stages did not launch there (238,336 and 246,784 bytes)."""
    from sparsepd.kernels.kv_rows import KVRowLayout
    from sparsepd.kernels.sparse_attention import SM90_SMEM_BYTES, smem_bytes
    chunked = [c for c in DEQUANT_CASES if c[6].dequant == "cvt_chunks"]
    assert len(chunked) >= 4
    for _T, _H, D, rope, _K, dtype, config in chunked:
        assert smem_bytes(config, D, dtype.itemsize, KVRowLayout(D, rope, dtype)) <= SM90_SMEM_BYTES, (config, dtype)
    too_deep = dataclasses.replace(DEQUANT_CASES[4][6], num_stages=5)  # the launch that failed on an H100
    assert smem_bytes(too_deep, 512, 4, KVRowLayout(512, 64, torch.float32)) > SM90_SMEM_BYTES


def test_fp8_dequant_variant_checks(device):
    from sparsepd.kernels.kv_rows import KVRowLayout, pack_kv_rows_ref
    q, kv, idx, sink = make_inputs(3200, 1, 16, 256, 8, torch.float16, "cpu")
    for layout, dtype, error in ((KVRowLayout(256, 128, torch.float16), torch.float16, "compact FP8 KV rows"),
                                 (KVRowLayout(256, 64, torch.float16), torch.float16, "bf16 or fp32")):
        rows = pack_kv_rows_ref(kv.to(dtype), layout)
        with pytest.raises(ValueError, match=error):
            sparse_attn(q.to(device), rows.to(device), idx.to(device), sink.to(device), 0.1, kv_layout=layout,
                        backend="triton", config=SparseAttnConfig(16, 16, 1, 4, 2, dequant="cvt_chunks"))
    with pytest.raises(ValueError, match="config.dequant must be one of"):
        sparse_attn(q.to(device), kv.to(device), idx.to(device), sink.to(device), 0.1, backend="triton",
                    config=SparseAttnConfig(16, 16, 1, 4, 2, dequant="fast"))
