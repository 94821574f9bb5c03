"""The fused compressor (kernels/compressor.py): Triton in the interpreter on CPU at small shapes (fp32
activations), at V4 shapes with bf16 on the GPU (SPARSEPD_TEST_GPU=1); against the references and an fp64
oracle built from each request's whole history (independent of the ring/input split and of the plan);
the references against the model's compressor bit for bit; and the prefill(L)+decode(n) = prefill(L+n)
invariant through the kernels and the ring writes."""

import os
from dataclasses import dataclass

import pytest
import torch

from sparsepd.kernels.compress_plan import build_compress_plan
from sparsepd.kernels.compressor import (
    CompressConfig,
    compress_indexer,
    compress_indexer_ref,
    compress_main,
    compress_main_ref,
    sylvester_hadamard,
)
from sparsepd.kernels.indexer import ROW_BYTES
from sparsepd.kernels.kv_rows import KVRowLayout, unpack_kv_rows
from sparsepd.kernels.state_update import compressor_state_write, compressor_state_write_ref

ON_GPU = os.environ.get("SPARSEPD_TEST_GPU") == "1"
MAIN_KINDS = [(4, True), (16, False)]
EPS = 1e-6
# (starts, num_new): fresh prefill; chunk ending mid-block + prefill + decodes (one committing); positions near 0
BATCHES = [([0], [37]), ([6, 0, 130, 3], [7, 12, 1, 1]), ([0, 1, 2, 5], [4, 3, 2, 3])]


@dataclass
class Case:
    starts: list
    num_new: list
    ratio: int
    overlap: bool
    d: int
    hist_kv: list  # per request [s+n, coff*d] fp32: the projected rows of every position so far
    hist_score: list
    kv: torch.Tensor
    score: torch.Tensor
    ape: torch.Tensor
    kv_state: torch.Tensor
    score_state: torch.Tensor
    slot_ids: torch.Tensor
    norm_weight: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    page_table: torch.Tensor
    num_pages: int
    rows_per_page: int


def make_case(seed, starts, num_new, ratio, overlap, d, rope, device, rows_per_page=4, num_slots=8) -> Case:
    g = torch.Generator().manual_seed(seed)
    num_slots = max(num_slots, len(starts))
    coff = 2 if overlap else 1
    width, W = coff * d, coff * ratio
    ape = 0.5 * torch.randn(ratio, width, generator=g)
    hist_kv = [torch.randn(s + n, width, generator=g) for s, n in zip(starts, num_new, strict=True)]
    hist_score = [2 * torch.randn(s + n, width, generator=g) for s, n in zip(starts, num_new, strict=True)]
    kv = torch.cat([h[s:] for h, s in zip(hist_kv, starts, strict=True)]) if starts else torch.zeros(0, width)
    score = torch.cat([h[s:] for h, s in zip(hist_score, starts, strict=True)]) if starts else torch.zeros(0, width)
    slot_ids = torch.randperm(num_slots, generator=g)[: len(starts)]
    kv_state = torch.zeros(num_slots, W, width)
    score_state = torch.full((num_slots, W, width), float("-inf"))
    for b, s in enumerate(starts):  # the ring as earlier forwards left it: positions s−W … s−1
        for q in range(max(0, s - W), s):
            kv_state[slot_ids[b], q % W] = hist_kv[b][q]
            score_state[slot_ids[b], q % W] = hist_score[b][q] + ape[q % ratio]
    max_pos = max([s + n for s, n in zip(starts, num_new, strict=True)], default=1) + 3
    angles = torch.arange(max_pos, dtype=torch.float64)[:, None] * (0.3 ** torch.arange(rope // 2, dtype=torch.float64))
    pages_each = max([(s + n) // ratio // rows_per_page + 1 for s, n in zip(starts, num_new, strict=True)], default=1)
    num_pages = len(starts) * pages_each + 3
    page_table = torch.randperm(num_pages, generator=g)[: len(starts) * pages_each].reshape(-1, pages_each)
    norm_weight = 0.5 + torch.rand(d, generator=g)
    dev = [t.to(device) for t in (kv, score, ape, kv_state, score_state, slot_ids, norm_weight,
                                  angles.cos().float(), angles.sin().float(), page_table.to(torch.int32))]
    return Case(starts, num_new, ratio, overlap, d, hist_kv, hist_score, *dev, num_pages, rows_per_page)


def oracle(case: Case, indexer: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat cache rows [E], fp64 rows [E, d]) of every entry committed by this forward, from the histories:
    pooling, RMSNorm, RoPE (and the Hadamard rotation for indexer keys); no intermediate rounding, no FP8."""
    ratio, d = case.ratio, case.d
    coff = 2 if case.overlap else 1
    W, rope = coff * ratio, 2 * case.cos.shape[1]
    flat, out = [], []
    for b, (s, n) in enumerate(zip(case.starts, case.num_new, strict=True)):
        hk, hs = case.hist_kv[b].double(), case.hist_score[b].double()
        hs = hs + case.ape.double().cpu()[torch.arange(hs.shape[0]) % ratio]
        for e in range(s // ratio, (s + n) // ratio):
            q = torch.arange(e * ratio + ratio - W, e * ratio + ratio)
            half = (torch.arange(W) // ratio)[:, None] * d + torch.arange(d)  # previous block: channels [0, d)
            k = torch.where((q >= 0)[:, None], hk[q.clamp(min=0)].gather(1, half), 0.0)
            sc = torch.where((q >= 0)[:, None], hs[q.clamp(min=0)].gather(1, half), float("-inf"))
            x = (sc.softmax(0) * k).sum(0)
            y = x * torch.rsqrt(x.square().mean() + EPS) * case.norm_weight.double().cpu()
            c, si = case.cos.double().cpu()[e * ratio], case.sin.double().cpu()[e * ratio]
            a, bb = y[-rope:][0::2], y[-rope:][1::2]
            y[-rope:] = torch.stack([a * c - bb * si, a * si + bb * c], dim=-1).flatten()
            if indexer:
                y = y @ sylvester_hadamard(d).double()
            page = int(case.page_table[b, e // case.rows_per_page])
            flat.append(page * case.rows_per_page + e % case.rows_per_page)
            out.append(y)
    rows = torch.stack(out) if out else torch.zeros(0, d, dtype=torch.float64)
    return torch.tensor(flat, dtype=torch.int64), rows


def run(case: Case, fn, cache, plan, **kw):
    fn(case.kv, case.score, case.ape, case.kv_state, case.score_state, case.slot_ids, plan, case.norm_weight,
       case.cos, case.sin, cache, case.page_table, eps=EPS, **kw)


def rel(x, ref):
    return float((x.double() - ref).norm() / ref.norm().clamp_min(1e-30))


def assert_rows_close(got, ref, ideal, ctx, quantized):
    """got (kernel) vs ref (reference), both vs the fp64 oracle `ideal`: no NaN; the kernel's error vs the
    oracle within 1.25× the reference's (+ a floor); elements that differ from the reference by more than
    rounding are rare (≤ 1%) and at most one FP8 step (1/8 relative) or a few act-dtype ulps."""
    got, ref = got.double().cpu(), ref.double().cpu()
    assert not got.isnan().any(), f"{ctx}: NaN in written rows"
    err_k, err_r = rel(got, ideal), rel(ref, ideal)
    assert err_k <= 1.25 * err_r + (1e-3 if quantized else 1e-5), f"{ctx}: error {err_k:.3e} vs reference {err_r:.3e}"
    rowmax = ref.abs().amax(-1, keepdim=True)
    diff = (got - ref).abs()
    far = diff > 1e-5 * ref.abs() + 1e-6 * rowmax
    assert float(far.double().mean()) <= 0.01, f"{ctx}: {int(far.sum())} of {far.numel()} elements differ"
    worst = (diff - (0.13 * ref.abs() + 2e-3 * rowmax)).flatten().argmax()
    assert diff.flatten()[worst] <= 0.13 * ref.abs().flatten()[worst] + 2e-3 * rowmax.expand_as(ref).flatten()[worst], (
        f"{ctx}: element {divmod(int(worst), ref.shape[1])} got {got.flatten()[worst]} ref {ref.flatten()[worst]}")


def check_untouched(cache_flat, written, poisoned, ctx):
    keep = torch.ones(cache_flat.shape[0], dtype=torch.bool)
    keep[written] = False
    assert poisoned(cache_flat[keep.to(cache_flat.device)]).all(), f"{ctx}: rows outside the plan were written"


def dequant(cache_flat):
    """FP8 cache rows [n, 144] → (values fp32 [n, 128], scale [n], padding bytes [n, 12])."""
    vals = cache_flat[:, :128].contiguous().view(torch.float8_e4m3fn).float()
    scale = cache_flat[:, 128:132].contiguous().view(torch.float32)[:, 0]
    return vals * scale[:, None], scale, cache_flat[:, 132:]


def check_main(case, plan, act_dtype, cache_dtype, fp8, device, ctx, config=None):
    d = case.d
    cache = torch.full((case.num_pages, case.rows_per_page, d), float("nan"), dtype=cache_dtype, device=device)
    ref = cache.clone()
    run(case, compress_main, cache, plan, act_dtype=act_dtype, fp8_nope=fp8, backend="triton", config=config)
    run(case, compress_main_ref, ref, plan, act_dtype=act_dtype, fp8_nope=fp8)
    flat, ideal = oracle(case, indexer=False)
    got_f, ref_f = cache.view(-1, d), ref.view(-1, d)
    check_untouched(got_f, flat, torch.isnan, ctx)
    if flat.numel():
        assert_rows_close(got_f[flat.to(device)], ref_f[flat.to(device)], ideal, ctx, quantized=fp8)


def check_main_rows(case, plan, act_dtype, device, ctx):
    """FP8 KV rows (kernels/kv_rows.py): the kernel's rows hold exactly the numbers its float path writes, the
    reference's rows those of the float reference, and kernel and reference agree as in check_main."""
    layout = KVRowLayout(case.d, 2 * case.cos.shape[1], act_dtype)
    rows = torch.full((case.num_pages, case.rows_per_page, layout.row_bytes), 0xFF, dtype=torch.uint8, device=device)
    rows_ref = rows.clone()
    run(case, compress_main, rows, plan, act_dtype=act_dtype, row_layout=layout, backend="triton")
    run(case, compress_main_ref, rows_ref, plan, act_dtype=act_dtype, row_layout=layout)
    flo = torch.full((case.num_pages, case.rows_per_page, case.d), float("nan"), dtype=act_dtype, device=device)
    flo_ref = flo.clone()
    run(case, compress_main, flo, plan, act_dtype=act_dtype, fp8_nope=True, backend="triton")
    run(case, compress_main_ref, flo_ref, plan, act_dtype=act_dtype, fp8_nope=True)
    flat, ideal = oracle(case, indexer=False)
    got_f, ref_f = rows.view(-1, layout.row_bytes), rows_ref.view(-1, layout.row_bytes)
    check_untouched(got_f, flat, lambda x: (x == 0xFF).all(-1), ctx)
    check_untouched(ref_f, flat, lambda x: (x == 0xFF).all(-1), ctx + " (reference)")
    if flat.numel():
        f = flat.to(device)
        got_v, ref_v = unpack_kv_rows(got_f[f], layout), unpack_kv_rows(ref_f[f], layout)
        assert torch.equal(got_v, flo.view(-1, case.d)[f]), f"{ctx}: FP8 rows differ from the float path's numbers"
        assert torch.equal(ref_v, flo_ref.view(-1, case.d)[f]), f"{ctx}: reference rows differ from its float rows"
        assert_rows_close(got_v, ref_v, ideal, ctx, quantized=True)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("ratio,overlap", MAIN_KINDS)
def test_main_fp8_rows(ratio, overlap, batch, device):
    starts, num_new = batch
    case = make_case(12, starts, num_new, ratio, overlap, 96, 32, device)
    plan = build_compress_plan(starts, num_new, ratio, overlap, device=device)
    check_main_rows(case, plan, torch.float32, device, f"rows ratio={ratio} batch={batch}")


def check_indexer(case, plan, act_dtype, device, ctx, config=None):
    cache = torch.full((case.num_pages, case.rows_per_page, ROW_BYTES), 255, dtype=torch.uint8, device=device)
    ref = cache.clone()
    run(case, compress_indexer, cache, plan, act_dtype=act_dtype, backend="triton", config=config)
    run(case, compress_indexer_ref, ref, plan, act_dtype=act_dtype)
    flat, ideal = oracle(case, indexer=True)
    got_f, ref_f = cache.view(-1, ROW_BYTES), ref.view(-1, ROW_BYTES)
    check_untouched(got_f, flat, lambda x: (x == 255).all(-1), ctx)
    if flat.numel():
        got_v, got_s, got_pad = dequant(got_f[flat.to(device)].cpu())
        ref_v, ref_s, _ = dequant(ref_f[flat.to(device)].cpu())
        assert (got_pad == 0).all(), f"{ctx}: padding bytes not zero"
        assert float((got_s != ref_s).double().mean()) <= 0.02, f"{ctx}: scales differ: {got_s} vs {ref_s}"
        assert_rows_close(got_v, ref_v, ideal, ctx, quantized=True)



@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("ratio,overlap", MAIN_KINDS)
def test_main_vs_reference_and_fp64(ratio, overlap, batch, fp8, device):
    starts, num_new = batch
    case = make_case(10, starts, num_new, ratio, overlap, 96, 32, device)  # d = 96: a masked channel tail
    plan = build_compress_plan(starts, num_new, ratio, overlap, device=device)
    check_main(case, plan, torch.float32, torch.float32, fp8, device, f"ratio={ratio} batch={batch} fp8={fp8}")


def test_hca_long_window(device):
    starts, num_new = [0, 126, 300], [260, 3, 1]  # ratio 128: prefill committing two, decodes
    case = make_case(11, starts, num_new, 128, False, 64, 16, device)
    plan = build_compress_plan(starts, num_new, 128, False, device=device)
    assert plan.commit.num_rows == 3
    check_main(case, plan, torch.float32, torch.float16, False, device, "hca")


@pytest.mark.parametrize("batch", BATCHES)
def test_indexer_vs_reference_and_fp64(batch, device):
    starts, num_new = batch
    case = make_case(12, starts, num_new, 4, True, 128, 64, device)
    plan = build_compress_plan(starts, num_new, 4, True, device=device)
    check_indexer(case, plan, torch.float32, device, f"indexer batch={batch}")


@pytest.mark.parametrize("config", [CompressConfig(2, 2, 1), CompressConfig(4, 4, 2)])
def test_other_launch_configs(config, device):
    """Several plan rows a program, and windows over several steps (the online softmax across steps)."""
    starts, num_new = BATCHES[1]
    case = make_case(15, starts, num_new, 4, True, 96, 32, device)
    plan = build_compress_plan(starts, num_new, 4, True, device=device)
    check_main(case, plan, torch.float32, torch.float32, True, device, f"main {config}", config=config)
    case = make_case(16, starts, num_new, 4, True, 128, 64, device)
    check_indexer(case, plan, torch.float32, device, f"indexer {config}", config=config)


def test_fixed_capacity_and_missing_pages_are_skipped(device):
    starts, num_new = [3, 4, 7, 11], [1, 1, 1, 1]
    case = make_case(13, starts, num_new, 4, True, 96, 32, device)
    case.page_table[3] = -1  # request 3 has no page: its entry is dropped, nothing else written
    plan = build_compress_plan(starts, num_new, 4, True, device=device, capacity=6)
    cache = torch.full((case.num_pages, case.rows_per_page, 96), float("nan"), device=device)
    run(case, compress_main, cache, plan, act_dtype=torch.float32, backend="triton")
    written = (~cache.view(-1, 96).isnan()).all(-1)
    assert int(written.sum()) == 2  # requests 0 and 2 commit; request 3's row and the −1 rows are skipped


def test_bad_inputs_raise():
    case = make_case(14, [0], [8], 4, True, 64, 16, "cpu")
    plan = build_compress_plan([0], [8], 4, True)
    cache = torch.zeros(case.num_pages, case.rows_per_page, 64)
    with pytest.raises(ValueError, match="kv must be"):
        compress_main(case.kv[:, :64].contiguous(), case.score, case.ape, case.kv_state, case.score_state,
                      case.slot_ids, plan, case.norm_weight, case.cos, case.sin, cache, case.page_table,
                      eps=EPS, act_dtype=torch.float32)
    with pytest.raises(ValueError, match="kv_state"):
        compress_main(case.kv, case.score, case.ape, case.kv_state[:, :4].contiguous(),
                      case.score_state[:, :4].contiguous(), case.slot_ids, plan, case.norm_weight, case.cos,
                      case.sin, cache, case.page_table, eps=EPS, act_dtype=torch.float32)
    with pytest.raises(ValueError, match="page_table"):
        compress_main(
            case.kv, case.score, case.ape, case.kv_state, case.score_state, case.slot_ids, plan, case.norm_weight,
            case.cos, case.sin, cache, case.page_table.long(), eps=EPS, act_dtype=torch.float32)
    with pytest.raises(ValueError, match="multiple of 64"):  # nope dims 64 − 16 = 48
        run(case, compress_main, cache, plan, act_dtype=torch.float32)
    with pytest.raises(ValueError, match="uint8"):
        run(case, compress_indexer, cache, plan, act_dtype=torch.float32)
    with pytest.raises(ValueError, match="act_dtype"):
        run(case, compress_main, cache, plan, act_dtype=torch.int8, fp8_nope=False)


# ----------------------------------------------------------------------------------------------------
# one request through successive forwards: the references equal the model's compressor bit for bit, and the
# kernels give the same caches and rings for prefill(L) + decode(n) as for prefill(L + n)


def forwards(fn_compress, fn_state, chunks, case_kw, output, device, **kw):
    """Run one request (slot 5 of 8) through the chunk lengths `chunks`; returns (cache rows in entry order, rings)."""
    ratio, overlap, d, rope = case_kw
    total = sum(chunks)
    full = make_case(20, [0], [total], ratio, overlap, d, rope, device, rows_per_page=4)
    coff = 2 if overlap else 1
    W = coff * ratio
    kv_state = torch.zeros(8, W, coff * d, device=device)
    score_state = torch.full((8, W, coff * d), float("-inf"), device=device)
    slot_ids = torch.tensor([5], device=device)
    page_table = torch.arange(full.page_table.shape[1], dtype=torch.int32, device=device)[None]
    if output == "main":
        cache = torch.full((page_table.shape[1], 4, d), float("nan"), device=device)
    else:
        cache = torch.full((page_table.shape[1], 4, ROW_BYTES), 255, dtype=torch.uint8, device=device)
    start = 0
    for n in chunks:
        plan = build_compress_plan([start], [n], ratio, overlap, device=device)
        kv, score = full.kv[start: start + n].contiguous(), full.score[start: start + n].contiguous()
        fn_compress(kv, score, full.ape, kv_state, score_state, slot_ids, plan, full.norm_weight, full.cos,
                    full.sin, cache, page_table, eps=EPS, act_dtype=torch.float32, **kw)
        fn_state(kv, score, full.ape, kv_state, score_state, slot_ids, plan)
        start += n
    entries = total // ratio
    return cache.view(-1, cache.shape[-1])[:entries], kv_state[5], score_state[5], full


# (ratio, overlap, d, rope_dim, output): the indexer's compressor is ratio 4 with overlap and d = 128
KINDS = [(4, True, 96, 32, "main"), (16, False, 96, 32, "main"), (4, True, 128, 64, "indexer")]


@pytest.mark.parametrize("ratio,overlap,d,rope,output", KINDS)
def test_references_equal_the_model_compressor(ratio, overlap, d, rope, output):
    from sparsepd.model.compressor import Compressor
    from sparsepd.model.state import CompressorRing

    chunks = [13, 6, 1, 1, 1, 1, 20]
    got, kv_ring, score_ring, full = forwards(compress_main_ref if output == "main" else compress_indexer_ref,
                                              compressor_state_write_ref, chunks, (ratio, overlap, d, rope),
                                              output, "cpu")
    model = Compressor(16, d, rope, ratio, EPS, output, "fp8", torch.float32)
    model.ape.data = full.ape.clone()
    model.norm.weight.data = full.norm_weight.clone()
    ring = CompressorRing.fresh(ratio, d, "cpu")  # the model: overlap exactly when ratio == 4
    freqs = 0.3 ** torch.arange(rope // 2, dtype=torch.float64)  # the case's cos/sin tables
    start, entries = 0, []
    for n in chunks:
        entries.append(model.commit(full.kv[start: start + n], full.score[start: start + n], start, ring, freqs))
        start += n
    want = torch.cat(entries)
    assert torch.equal(ring.kv, kv_ring) and torch.equal(ring.score, score_ring)
    assert got.shape == want.shape and torch.equal(got, want)


@pytest.mark.parametrize("ratio,overlap,d,rope,output", KINDS)
def test_prefill_then_decode_equals_one_prefill(ratio, overlap, d, rope, output, device):
    fn = compress_main if output == "main" else compress_indexer
    L, n = 21, 14
    whole = forwards(fn, compressor_state_write, [L + n], (ratio, overlap, d, rope), output, device,
                     backend="triton")
    split = forwards(fn, compressor_state_write, [L] + [1] * n, (ratio, overlap, d, rope), output, device,
                     backend="triton")
    for a, b, what in zip(whole[:3], split[:3], ("cache", "kv ring", "score ring"), strict=True):
        assert torch.equal(a, b), f"{what} differs between prefill(L+n) and prefill(L)+decode(n)"
    assert not whole[0].isnan().any() if output == "main" else (whole[0] != 255).any(-1).all()


# ----------------------------------------------------------------------------------------------------
# real V4 shapes on the GPU, bf16 activations and cache


@pytest.mark.skipif(not ON_GPU, reason="real shapes on the GPU")
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("ratio,overlap", [(4, True), (128, False)])
def test_real_shapes_main(ratio, overlap, fp8, device):
    # prefills (one continuing at 1000), decodes at random positions and three that commit an HCA entry
    decodes = torch.randint(0, 1200, (58,), generator=torch.Generator().manual_seed(1)).tolist() + [127, 255, 1023]
    starts, num_new = [0, 0, 1000] + decodes, [1024, 517, 300] + [1] * 61
    case = make_case(30, starts, num_new, ratio, overlap, 512, 64, device, rows_per_page=128 // ratio * 4)
    plan = build_compress_plan(starts, num_new, ratio, overlap, device=device)
    check_main(case, plan, torch.bfloat16, torch.bfloat16, fp8, device, f"gpu ratio={ratio} fp8={fp8}")


@pytest.mark.skipif(not ON_GPU, reason="real shapes on the GPU")
@pytest.mark.parametrize("ratio,overlap", [(4, True), (128, False)])
def test_real_shapes_main_fp8_rows(ratio, overlap, device):
    decodes = torch.randint(0, 1200, (58,), generator=torch.Generator().manual_seed(2)).tolist() + [127, 255, 1023]
    starts, num_new = [0, 0, 1000] + decodes, [1024, 517, 300] + [1] * 61
    case = make_case(31, starts, num_new, ratio, overlap, 512, 64, device, rows_per_page=128 // ratio * 4)
    plan = build_compress_plan(starts, num_new, ratio, overlap, device=device)
    check_main_rows(case, plan, torch.bfloat16, device, f"gpu rows ratio={ratio}")


@pytest.mark.skipif(not ON_GPU, reason="real shapes on the GPU")
def test_real_shapes_indexer(device):
    starts = [0, 0, 1000] + [4 * i + 3 for i in range(61)]
    num_new = [1024, 517, 300] + [1] * 61
    case = make_case(31, starts, num_new, 4, True, 128, 64, device, rows_per_page=32)
    plan = build_compress_plan(starts, num_new, 4, True, device=device)
    check_indexer(case, plan, torch.bfloat16, device, "gpu indexer")


# HCA decode: the 128-row window split over programs, merged by the last one (atomic ticket), against the reference
# and fp64 like the one-program launch; several entry blocks a program (block_m 2) and one-row splits included.
@pytest.mark.parametrize("config", [CompressConfig(1, 8, 4, window_splits=1), CompressConfig(1, 8, 4, window_splits=8),
                                    CompressConfig(2, 4, 2, window_splits=4),
                                    CompressConfig(1, 8, 1, window_splits=16)])
def test_hca_window_split_across_programs(config, device):
    starts, num_new = [127, 0, 255, 1000, 383], [1, 1, 1, 1, 1]  # decodes: three commit an entry
    case = make_case(40, starts, num_new, 128, False, 96, 32, device)
    plan = build_compress_plan(starts, num_new, 128, False, device=device)
    assert plan.commit.num_rows == 3
    for fp8 in (False, True):
        check_main(case, plan, torch.float32, torch.float32, fp8, device, f"hca split {config} fp8={fp8}", config)


def test_hca_default_splits_the_window_at_decode_only():
    from sparsepd.kernels.compressor import window_splits
    assert window_splits(128, 128, 132) == 8  # decode plan (128 rows, few commits)
    assert window_splits(128, 4096, 132) == 1  # prefill: one program an entry
    assert window_splits(4, 8, 132) == 1  # CSA windows are 8 rows


def test_window_splits_must_tile_the_window(device):
    starts, num_new = [127], [1]
    case = make_case(41, starts, num_new, 128, False, 96, 32, device)
    plan = build_compress_plan(starts, num_new, 128, False, device=device)
    with pytest.raises(ValueError, match="window_splits=3"):
        check_main(case, plan, torch.float32, torch.float32, False, device, "bad", CompressConfig(1, 8, 4, 3))
