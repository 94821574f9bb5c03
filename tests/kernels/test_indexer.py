"""kernels/indexer.py: FP8 row quantization, the paged indexer cache, scores and top-k selection.

Quantization and cache writes must equal the reference byte for byte; scores are compared with an fp64
computation written here (dequantize, then dot) under a bound relative to the magnitude of the terms, and
selections are compared as sets under that bound (the k-th score included). On CPU the kernels run in the
Triton interpreter at small shapes (fp16 tiles for the dot); with SPARSEPD_TEST_GPU=1 also at the real
shapes (Hi = 64, 32 rows a page, thousands of entries) with the FP8 MMA.
"""

import os

import pytest
import torch

from sparsepd.kernels.device import fp8_e4m3_dtype
from sparsepd.kernels.indexer import (
    ROW_BYTES,
    ScoreConfig,
    dequantize_rows_fp8,
    fp8_max,
    indexer_cache_read,
    indexer_cache_write,
    indexer_cache_write_ref,
    indexer_scores,
    indexer_scores_ref,
    indexer_topk,
    indexer_topk_ref,
    quantize_rows_fp8,
    quantize_rows_fp8_ref,
)

ON_GPU = os.environ.get("SPARSEPD_TEST_GPU") == "1"
POISON_BYTE = 0xAB
# Score error over Σ_h |w_h| Σ_d |q_hd k_d| (fp64): fp32 accumulation of exact fp8 products on the fp16 path
# (CPU interpreter); Hopper's FP8 MMA accumulates with fewer mantissa bits (H100: 1.9e-4 of Σ_h |term_h|).
SCORE_TOL_FP16_DOT = 2e-5
SCORE_TOL_FP8_MMA = 2e-3


def score_tol(device):
    return SCORE_TOL_FP8_MMA if device.type == "cuda" else SCORE_TOL_FP16_DOT


def spread_rows(seed, n, dtype=torch.float32):
    """Rows of 128 values over 10 decades, one all-zero row, one with a single value, some −0.0."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 128, generator=g) * torch.logspace(-6, 4, n)[:, None]
    x[0] = 0.0
    if n > 1:
        x[1] = 0.0
        x[1, 5] = -3.0
    if n > 2:
        x[2, :7] = -0.0
    if n > 3:  # scale 1 (amax 448): exact rounding midpoints, normal and subnormal, both signs
        mids = torch.tensor([17.0, 19.0, 1.0625, 1.1875, 0.5 * 2**-9, 1.5 * 2**-9, 2.5 * 2**-9, 9.5 * 2**-9])
        x[3] = 0.0
        x[3, 0] = 448.0
        x[3, 1:9], x[3, 9:17] = mids, -mids
    return x.to(dtype)


# ----------------------------------------------------------------------------------------------------
# quantization


@pytest.mark.parametrize("scale_fmt", ["ue8m0", "float"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_quantize_matches_reference_bytes(scale_fmt, dtype, device):
    x = spread_rows(1, 67, dtype)
    x8, scale = quantize_rows_fp8(x.to(device), scale_fmt, backend="triton")
    r8, rscale = quantize_rows_fp8_ref(x, scale_fmt)
    bad = (x8.cpu().view(torch.uint8) != r8.view(torch.uint8)).nonzero()
    assert bad.numel() == 0, f"{bad.shape[0]} bytes differ, first [row, col] {bad[:5].tolist()} ({scale_fmt} {dtype})"
    assert torch.equal(scale.cpu(), rscale), f"scales differ at rows {(scale.cpu() != rscale).nonzero()[:5]}"


def test_quantize_keeps_leading_dims(device):
    x = spread_rows(2, 3 * 5, torch.float32).view(3, 5, 128)
    x8, scale = quantize_rows_fp8(x.to(device), backend="triton")
    assert x8.shape == (3, 5, 128) and scale.shape == (3, 5) and x8.dtype == fp8_e4m3_dtype(device)
    r8, rscale = quantize_rows_fp8_ref(x)
    assert torch.equal(x8.cpu().view(torch.uint8), r8.view(torch.uint8)) and torch.equal(scale.cpu(), rscale)


@pytest.mark.parametrize("scale_fmt", ["ue8m0", "float"])
def test_quantization_round_trip_error(scale_fmt):
    """Against fp64: scales as specified, and each value within half an e4m3 step of itself."""
    x = spread_rows(3, 61, torch.float32)
    x8, scale = quantize_rows_fp8_ref(x, scale_fmt)
    top = fp8_max(x8.dtype)
    amax = x.double().abs().amax(-1).clamp_min(1e-4)
    s = scale.double()
    assert (s > 0).all()
    if scale_fmt == "ue8m0":
        assert torch.equal(torch.exp2(torch.log2(s).round()), s), "ue8m0 scales are powers of two"
        assert ((s >= amax / top) & (s < 2 * amax / top)).all()
    else:
        assert torch.allclose(s, amax / top, rtol=1e-7, atol=0)
    back = dequantize_rows_fp8(x8, scale).double()
    step = torch.maximum(x.double().abs() * 2.0**-4, s[:, None] * 2.0**-10)  # half ulp, normal / subnormal
    err = (back - x.double()).abs()
    assert not torch.isnan(back).any()
    worst = (err / step).max()
    assert worst <= 1.0 + 1e-6, f"round trip error {worst:.3f} half-steps ({scale_fmt})"
    assert (back[0] == 0).all() and back[1, 5] == -3.0


# ----------------------------------------------------------------------------------------------------
# cache


def poisoned_cache(pages, rows_per_page, device):
    return torch.full((pages, rows_per_page, ROW_BYTES), POISON_BYTE, dtype=torch.uint8, device=device)


@pytest.mark.parametrize("scale_fmt", ["ue8m0", "float"])
def test_cache_write_matches_reference(scale_fmt, device):
    pages, R, n = 6, 8, 37
    g = torch.Generator().manual_seed(4)
    k = spread_rows(4, n, torch.bfloat16)
    slots = torch.randperm(pages * R, generator=g)[:n]
    slots[3] = -1
    slots[10] = -1
    ours = poisoned_cache(pages, R, device)
    indexer_cache_write(ours, k.to(device), slots.to(device), scale_fmt, backend="triton")
    ref = poisoned_cache(pages, R, "cpu")
    indexer_cache_write_ref(ref, k, slots, scale_fmt)
    bad = (ours.cpu() != ref).nonzero()
    assert bad.numel() == 0, f"{bad.shape[0]} bytes differ, first [page, row, byte] {bad[:5].tolist()}"
    flat = ref.view(-1, ROW_BYTES)
    written = slots[slots >= 0]
    assert (flat[written, 132:] == 0).all(), "padding is zeroed"
    untouched = torch.ones(pages * R, dtype=torch.bool)
    untouched[written] = False
    assert (flat[untouched] == POISON_BYTE).all(), "rows not addressed (and slots of −1) stay untouched"


def test_write_then_read_returns_the_quantized_rows(device):
    pages, R = 5, 4
    k = spread_rows(5, 17, torch.float32).to(device)
    slots = torch.tensor([19, 0, 3, 4, 7, 8, 11, 12, 15, 16, 1, 2, 5, 6, 9, 10, 13], device=device)  # crosses pages
    cache = poisoned_cache(pages, R, device)
    indexer_cache_write(cache, k, slots, backend="triton")
    k8, scale = indexer_cache_read(cache, slots)
    r8, rscale = quantize_rows_fp8_ref(k.cpu())
    assert torch.equal(k8.cpu().view(torch.uint8), r8.view(torch.uint8))
    assert torch.equal(scale.cpu(), rscale)
    before = cache.clone()
    indexer_cache_write(cache, dequantize_rows_fp8(k8, scale), slots, backend="triton")  # re-quantize: same bytes
    assert torch.equal(cache, before)


def test_out_of_range_slots(device):
    cache = poisoned_cache(2, 4, device)
    k = spread_rows(6, 2).to(device)
    slots = torch.tensor([3, 8], device=device)
    with pytest.raises(ValueError, match="slots must be <"):
        indexer_cache_write_ref(cache.cpu(), k.cpu(), slots.cpu())
    indexer_cache_write(cache, k, slots, backend="triton")  # the kernel skips slot 8, writes slot 3
    flat = cache.view(-1, ROW_BYTES).cpu()
    assert (flat[:3] == POISON_BYTE).all() and (flat[4:] == POISON_BYTE).all() and (flat[3] != POISON_BYTE).any()
    with pytest.raises(ValueError, match="slots must be in"):
        indexer_cache_read(cache, slots)


def test_bad_cache_inputs_raise():
    cache = poisoned_cache(2, 4, "cpu")
    k = torch.randn(3, 128)
    with pytest.raises(ValueError, match="slots must be int64"):
        indexer_cache_write(cache, k, torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="cache must be"):
        indexer_cache_write(cache[:, :, :128], k, torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"k must be a \[..., 128\]"):
        indexer_cache_write(cache, torch.randn(3, 64), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="scale_fmt"):
        quantize_rows_fp8(k, "e4m3")


# ----------------------------------------------------------------------------------------------------
# scores and top-k


def make_case(seed, T, H, R, n_req, visible, device, fp8_q=True):
    """A pool with n_req requests on shuffled, interleaved pages; tokens spread over the requests."""
    g = torch.Generator().manual_seed(seed)
    max_pages = max(1, -(-max(visible) // R))
    pages = n_req * max_pages + 3
    cache = poisoned_cache(pages, R, "cpu")
    keys = torch.randn(pages * R, 128, generator=g) * (0.5 + torch.rand(pages * R, 1, generator=g))
    indexer_cache_write_ref(cache, keys, torch.arange(pages * R))
    page_table = torch.randperm(pages, generator=g)[: n_req * max_pages].view(n_req, max_pages).to(torch.int32)
    seq_ids = torch.arange(T) % n_req
    seq_ids = seq_ids[torch.randperm(T, generator=g)].to(torch.int32)
    q = torch.randn(T, H, 128, generator=g)
    weights = torch.randn(T, H, generator=g)
    vis = torch.tensor(visible, dtype=torch.int32)
    q_in, q_scale = quantize_rows_fp8_ref(q) if fp8_q else (q, None)
    to = lambda x: None if x is None else x.to(device)
    return [to(x) for x in (q_in, q_scale, weights, cache, page_table, seq_ids, vis)]


def fp64_scores(q8, q_scale, weights, cache, page_table, seq_ids, visible):
    """Dequantize both sides, dot in fp64: (scores [T, E] with −inf past visible, and the magnitude that bounds
    the rounding of the dots' accumulation, Σ_h |w_h| · Σ_d |q_hd · k_ed| [T, E])."""
    T, H, _ = q8.shape
    R = cache.shape[1]
    E = page_table.shape[1] * R
    e = torch.arange(E)
    qd = dequantize_rows_fp8(q8.cpu(), q_scale.cpu()).double()  # [T, H, 128]
    w = weights.cpu().double()
    scores = torch.zeros(T, E, dtype=torch.float64)
    mag = torch.zeros(T, E, dtype=torch.float64)
    for b in range(page_table.shape[0]):
        tok = (seq_ids.cpu() == b).nonzero().flatten()
        rows = page_table[b].cpu().long()[e // R] * R + e % R  # [E]
        keys = dequantize_rows_fp8(*indexer_cache_read(cache.cpu(), rows)).double()  # [E, 128]
        for h in range(H):
            scores[tok] += torch.relu(qd[tok, h] @ keys.T) * w[tok, h, None]  # [Tb, E]
            mag[tok] += (qd[tok, h].abs() @ keys.abs().T) * w[tok, h, None].abs()
    past = e[None, :] >= visible.cpu().long()[:, None]
    return scores.masked_fill(past, float("-inf")), mag.masked_fill(past, 0.0)


def assert_scores_close(got, ref64, mag, tol, ctx):
    got = got.cpu().double()
    assert not torch.isnan(got).any(), f"NaN in scores ({ctx})"
    assert torch.equal(torch.isneginf(got), torch.isneginf(ref64)), f"−inf exactly past visible[t] ({ctx})"
    fin = torch.isfinite(ref64)
    err = torch.where(fin, (got - ref64).abs(), 0.0)
    bound = tol * mag + 1e-30
    worst = (err / bound).max()
    if worst > 1:
        t, e = divmod(int((err / bound).argmax()), ref64.shape[1])
        raise AssertionError(f"score error {float(err[t, e]):.3e} > {tol:g}·magnitude = {float(bound[t, e]):.3e} "
                             f"at [t={t}, e={e}] ({ctx})")


def assert_selection(idx, ref64, mag, visible, k, tol, order, ctx):
    """As sets under the score bound; the k-th best equals the reference's k-th; order; −1 padding."""
    idx = idx.cpu()
    E = ref64.shape[1]
    for t in range(idx.shape[0]):
        n = min(max(int(visible[t]), 0), E)
        m = min(k, n)
        row = idx[t]
        assert (row[m:] == -1).all(), f"row {t}: −1 padding after {m} entries ({ctx}): {row.tolist()[:16]}"
        sel = row[:m].long()
        assert ((sel >= 0) & (sel < n)).all(), f"row {t}: positions outside [0, {n}) ({ctx})"
        assert sel.unique().numel() == m, f"row {t}: repeated positions ({ctx})"
        if m == 0:
            continue
        s, b = ref64[t, :n], tol * mag[t, :n]
        chosen = torch.zeros(n, dtype=torch.bool)
        chosen[sel] = True
        kth = s.sort(descending=True).values[m - 1]
        assert abs(float(s[sel].min() - kth)) <= float(2 * b.max()), f"row {t}: k-th score differs ({ctx})"
        if m < n:
            worst_in, best_out = (s[chosen] + b[chosen]).min(), (s[~chosen] - b[~chosen]).max()
            assert worst_in >= best_out, f"row {t}: a dropped entry beats a chosen one ({ctx})"
        if order == "score":
            steps = s[sel][1:] - s[sel][:-1]
            assert (steps <= 2 * b.max()).all(), f"row {t}: not in descending score order ({ctx})"
        else:
            assert (sel[1:] > sel[:-1]).all(), f"row {t}: not in ascending position order ({ctx})"


CPU_CASES = [  # T, H, rows_per_page, requests, visible (0, 1, < k, = k, > k, across pages), k
    (6, 4, 8, 2, [0, 1, 5, 16, 40, 37], 16),
    (5, 16, 4, 3, [17, 3, 33, 0, 30], 8),
    (4, 20, 16, 1, [100, 64, 99, 2], 40),
    (9, 4, 8, 1, [50, 50, 51, 51, 51, 51, 52, 52, 52], 12),  # a prefill chunk: groups of 4 share the keys
]
# default; several tokens a program (shared groups, mixed groups fall back to one token a program)
CPU_CONFIGS = [None, ScoreConfig(block_e=16, num_warps=4, num_stages=2, tokens=4, programs_per_sm=2)]


@pytest.mark.parametrize("config", CPU_CONFIGS)
@pytest.mark.parametrize("case", range(len(CPU_CASES)))
def test_scores_and_selection_vs_fp64(case, config, device):
    T, H, R, n_req, visible, k = CPU_CASES[case]
    args = make_case(case, T, H, R, n_req, visible, device)
    ctx = f"case {CPU_CASES[case]} {config}"
    out = torch.full((T, args[4].shape[1] * R), float("nan"), device=device)
    scores = indexer_scores(*args, out=out, backend="triton", config=config)
    assert scores is out
    ref64, mag = fp64_scores(*args)
    assert_scores_close(scores, ref64, mag, score_tol(device), ctx)
    assert_scores_close(indexer_scores_ref(*[a.cpu() for a in args]), ref64, mag, 1e-7, ctx + " reference")
    for order in ("score", "position"):
        idx = torch.full((T, k), -5, dtype=torch.int32, device=device)
        got = indexer_topk(*args, k, order=order, out=idx, backend="triton", score_config=config)
        assert got is idx
        assert_selection(idx, ref64, mag, args[6].cpu(), k, score_tol(device), order, ctx + f" {order}")
        ref_idx = indexer_topk_ref(*[a.cpu() for a in args], k, order=order)
        assert_selection(ref_idx, ref64, mag, args[6].cpu(), k, 1e-7, order, ctx + f" {order} reference")


def test_float_q_is_quantized_inside(device):
    q8, q_scale, *rest = make_case(7, 3, 4, 8, 1, [20, 9, 13], device)
    q = dequantize_rows_fp8(q8, q_scale).to(torch.bfloat16)  # exactly representable: the same bytes again
    a = indexer_scores(q8, q_scale, *rest, backend="triton")
    b = indexer_scores(q, None, *rest, backend="triton")
    assert torch.equal(a, b)
    c = indexer_scores_ref(q.cpu(), None, *[x.cpu() for x in rest])
    assert torch.equal(c, indexer_scores_ref(q8.cpu(), q_scale.cpu(), *[x.cpu() for x in rest]))


def test_reference_is_batch_invariant():
    """A token's reference scores and selection do not depend on the batch or the page-table width (the
    CPU model's chunked prefill reproduces state bit for bit through this)."""
    q8, q_scale, w, cache, page_table, seq_ids, vis = make_case(8, 5, 4, 4, 1, [9, 21, 4, 16, 13], "cpu")
    whole = indexer_scores_ref(q8, q_scale, w, cache, page_table, seq_ids, vis)
    whole_idx = indexer_topk_ref(q8, q_scale, w, cache, page_table, seq_ids, vis, 6)
    wider = torch.cat([page_table, page_table.flip(1)], dim=1)  # more (unused) pages
    for t in range(5):
        sl = slice(t, t + 1)
        alone = indexer_scores_ref(q8[sl], q_scale[sl], w[sl], cache, wider, seq_ids[sl], vis[sl])
        n = int(vis[t])
        assert torch.equal(alone[0, :n], whole[t, :n])
        assert torch.equal(indexer_topk_ref(q8[sl], q_scale[sl], w[sl], cache, wider, seq_ids[sl], vis[sl], 6)[0],
                           whole_idx[t])


def test_bad_index_inputs_raise():
    args = make_case(9, 2, 4, 4, 1, [3, 5], "cpu")
    q8, q_scale, w, cache, pt, seq, vis = args
    with pytest.raises(ValueError, match="FP8 q needs q_scale"):
        indexer_scores(q8, None, w, cache, pt, seq, vis)
    with pytest.raises(ValueError, match="q_scale must be None"):
        indexer_scores(q8.float(), q_scale, w, cache, pt, seq, vis)
    with pytest.raises(ValueError, match="page_table must be int32"):
        indexer_scores(q8, q_scale, w, cache, pt.long(), seq, vis)
    with pytest.raises(ValueError, match="visible must be int32"):
        indexer_scores(q8, q_scale, w, cache, pt, seq, vis[:1])
    with pytest.raises(ValueError, match="weights must be fp32"):
        indexer_scores(q8, q_scale, w.half(), cache, pt, seq, vis)


# ----------------------------------------------------------------------------------------------------
# device: real shapes


GPU_CASES = [  # T, requests, visible range, pages width (entries = pages · 32), k, scoring config
    (8, 8, (1500, 8192), 256, 512, None),  # decode, 32K context
    (8, 8, (0, 8192), 256, 2048, None),
    (4, 4, (20000, 32768), 1024, 1024, None),  # 128K context: the top-k's candidate rounds
    (256, 1, (1800, 2048), 64, 2048, None),  # prefill chunk: many tokens, one request
    (254, 1, (1800, 2048), 64, 512, ScoreConfig(64, 8, 3, tokens=4)),  # ... 4 tokens a program
    (66, 3, (100, 2048), 64, 512, ScoreConfig(64, 8, 3, tokens=4)),  # ... groups mixing requests
    (509, 1, (1500, 2048), 64, 1024, ScoreConfig(64, 8, 3, tokens=8)),  # ... 8 tokens a program
]


@pytest.mark.skipif(not ON_GPU, reason="real shapes on the GPU")
@pytest.mark.parametrize("case", range(len(GPU_CASES)))
def test_real_shapes_vs_fp64(case, device):
    T, n_req, (lo, hi), width, k, config = GPU_CASES[case]
    g = torch.Generator().manual_seed(100 + case)
    visible = torch.randint(lo, hi + 1, (T,), generator=g).tolist()
    visible[0] = hi
    args = make_case(100 + case, T, 64, 32, n_req, visible, device)
    assert args[4].shape[1] == width
    ctx = f"gpu case {GPU_CASES[case]}"
    scores = indexer_scores(*args, out=torch.full((T, width * 32), float("nan"), device=device), config=config)
    ref64, mag = fp64_scores(*args)
    assert_scores_close(scores, ref64, mag, SCORE_TOL_FP8_MMA, ctx)
    for order in ("score", "position"):
        idx = indexer_topk(*args, k, order=order, out=torch.full((T, k), -5, dtype=torch.int32, device=device),
                           score_config=config)
        assert_selection(idx, ref64, mag, args[6].cpu(), k, SCORE_TOL_FP8_MMA, order, ctx + f" {order}")


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs")
def test_decode_replays_under_a_cuda_graph(device):
    T, k = 16, 512
    args = make_case(200, T, 64, 32, T, [4000] * T, device)
    q8, q_scale, w, cache, pt, seq, vis = args
    out = torch.empty((T, k), dtype=torch.int32, device=device)
    indexer_topk(*args, k, out=out)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        indexer_topk(*args, k, out=out)
    vis.copy_(torch.randint(0, 4001, (T,), dtype=torch.int32))
    w.normal_()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, indexer_topk(*args, k))
