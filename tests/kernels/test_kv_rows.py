"""FP8 KV rows (kernels/kv_rows.py): the byte layout bit for bit, the Triton pack against the reference, and
sparse attention over FP8 rows (kernels/sparse_attention.py) against the fp64 reference on the dequantized rows.

On CPU the kernels run in the interpreter at small shapes with fp16/fp32 dot inputs; with SPARSEPD_TEST_GPU=1
the same tests also run bf16 at V4 shapes."""

import os

import pytest
import torch
import triton
import triton.language as tl

from sparsepd.kernels.kv_rows import (
    KVRowLayout,
    _e4m3fn_cvt,
    _e4m3fn_dequant,
    pack_kv_rows,
    pack_kv_rows_ref,
    unpack_kv_rows,
)
from sparsepd.kernels.sparse_attention import SparseAttnConfig, sparse_attn, sparse_attn_ref
from sparsepd.model.numerics import fp8_round_trip

ON_GPU = os.environ.get("SPARSEPD_TEST_GPU") == "1"
LAYOUTS = [(512, 64, torch.bfloat16), (96, 32, torch.float32), (192, 64, torch.float16)]


def model_rows(seed, n, layout, device):
    """Latents as the model stores them: nope dims rounded to e4m3 with power-of-two scales per 64, rows of very
    different magnitudes (a zero row, a tiny one, a large one), in rope_dtype."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, layout.head_dim, generator=g) * torch.exp2(torch.randint(-12, 6, (n, 1), generator=g))
    x[0] = 0.0
    x[1, :64] = 1e-6  # under the amax floor
    x[:, : layout.nope_dim] = fp8_round_trip(x[:, : layout.nope_dim], 64)
    return x.to(layout.rope_dtype).to(device)


def same_bits(a, b):
    return a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def test_v4_row_is_584_bytes():
    layout = KVRowLayout(512, 64, torch.bfloat16)
    assert (layout.nope_dim, layout.scale_offset, layout.num_scales, layout.row_bytes) == (448, 576, 7, 584)
    assert KVRowLayout(96, 32, torch.float32).row_bytes == 200  # 64 + 128 + 1 → 8-byte multiple


@pytest.mark.parametrize("head_dim,rope,dtype", LAYOUTS)
def test_layout_bytes_by_hand(head_dim, rope, dtype):
    """The reference's bytes are the documented layout: codes, rope bytes, ue8m0 scale bytes, zero padding."""
    layout = KVRowLayout(head_dim, rope, dtype)
    x = model_rows(1, 9, layout, "cpu")
    rows = pack_kv_rows_ref(x, layout)
    nope = layout.nope_dim
    for r in range(x.shape[0]):
        for b in range(layout.num_scales):
            blk = x[r, b * 64:(b + 1) * 64].double()
            amax = max(float(blk.abs().max()), 1e-4)
            e = int(rows[r, layout.scale_offset + b]) - 127
            assert 2.0 ** (e - 1) < amax / 448 <= 2.0 ** e, (r, b, e, amax)  # the smallest power of two that fits
            codes = rows[r, b * 64:(b + 1) * 64].view(torch.float8_e4m3fn).double()
            assert torch.equal(codes * 2.0 ** e, blk), (r, b)
        assert same_bits(rows[r, nope: layout.scale_offset].view(dtype), x[r, nope:])
        assert (rows[r, layout.scale_offset + layout.num_scales:] == 0).all()


@pytest.mark.parametrize("head_dim,rope,dtype", LAYOUTS)
def test_round_trip_bit_for_bit(head_dim, rope, dtype, device):
    layout = KVRowLayout(head_dim, rope, dtype)
    x = model_rows(2, 37, layout, device)
    out = torch.full((37, layout.row_bytes), 0xA5, dtype=torch.uint8, device=device)  # poison
    got = pack_kv_rows(x, layout, out, backend="triton")
    assert got is out
    ref = pack_kv_rows_ref(x, layout)
    assert torch.equal(got, ref), f"{int((got != ref).sum())} bytes differ from the reference"
    assert same_bits(unpack_kv_rows(got, layout), x)  # the model's numbers come back exactly
    assert torch.equal(pack_kv_rows(unpack_kv_rows(got, layout), layout, backend="triton"), got)  # and pack again


def test_pack_rejects_bad_inputs():
    layout = KVRowLayout(96, 32, torch.float32)
    with pytest.raises(ValueError, match=r"x must be a bf16/fp16/fp32 \[N, 96\]"):
        pack_kv_rows(torch.zeros(3, 64), layout)
    with pytest.raises(ValueError, match=r"out must be uint8 \[\.\.\., 200\]"):
        pack_kv_rows(torch.zeros(3, 96), layout, torch.zeros(3, 96))
    with pytest.raises(ValueError, match="multiple of 64"):
        KVRowLayout(100, 32, torch.float32)
    with pytest.raises(ValueError, match=r"rows must be uint8 \[\.\.\., 200\]"):
        unpack_kv_rows(torch.zeros(2, 199, dtype=torch.uint8), layout)


# ----------------------------------------------------------------------------------------------------
# sparse attention over FP8 rows

OUT_TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}
LSE_TOL = {torch.bfloat16: 1e-3, torch.float16: 1e-5, torch.float32: 1e-6}
# (T, H, head_dim, rope, K, dtype, config)
CPU_CASES = [
    (3, 16, 96, 32, 40, torch.float32, None),
    (2, 20, 192, 64, 33, torch.float16, None),
    (3, 16, 192, 64, 70, torch.float16, SparseAttnConfig(16, 16, 3, 4, 2)),  # split keys
    (2, 16, 512, 64, 24, torch.float16, None),  # V4 row geometry (fp16 rope in the interpreter)
]
GPU_CASES = [
    (1, 64, 512, 64, 640, torch.bfloat16, None),
    (1, 128, 512, 64, 1152, torch.bfloat16, None),
    (64, 64, 512, 64, 640, torch.bfloat16, None),
    (37, 128, 512, 64, 1152, torch.bfloat16, None),
    (300, 64, 512, 64, 640, torch.bfloat16, None),
    (9, 64, 512, 64, 1152, torch.bfloat16, SparseAttnConfig(64, 16, 7, 8, 4)),
]
CASES = CPU_CASES + (GPU_CASES if ON_GPU else [])


@pytest.mark.parametrize("case", range(len(CASES)))
def test_sparse_attn_over_fp8_rows_matches_fp64(case, device):
    T, H, D, rope, K, dtype, config = CASES[case]
    g = torch.Generator().manual_seed(50 + case)
    layout = KVRowLayout(D, rope, dtype)
    R = 2 * K + 13
    rows = pack_kv_rows_ref(model_rows(60 + case, R, layout, "cpu").float().clamp(-60000, 60000).to(dtype), layout)
    q = (2.0 * torch.randn(T, H, D, generator=g) / 4).to(dtype)
    idx = torch.stack([torch.randperm(R, generator=g)[:K] for _ in range(T)]).to(torch.int32)
    idx[torch.rand(T, K, generator=g) < 0.3] = -1
    idx[0] = -1  # a token without keys
    idx[-1, 0] = R - 1
    sink = 2.0 * torch.randn(H, generator=g)
    sink[1] = float("-inf")
    q, rows, idx, sink = q.to(device), rows.to(device), idx.to(device), sink.to(device)
    out = torch.full((T, H, D), float("nan"), dtype=dtype, device=device)
    lse = torch.full((T, H), float("nan"), dtype=torch.float32, device=device)
    scale = D ** -0.5
    sparse_attn(q, rows, idx, sink, scale, out, lse, kv_layout=layout, backend="triton", config=config)
    kv = unpack_kv_rows(rows, layout).double()  # the dequantized rows: the reference's input
    ref_out, ref_lse = sparse_attn_ref(q.double(), kv, idx, sink.double(), scale)
    out, lse, ref_out, ref_lse = out.double().cpu(), lse.double().cpu(), ref_out.cpu(), ref_lse.cpu()
    assert not out.isnan().any() and not lse.isnan().any(), "unwritten (poisoned) outputs"
    empty = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse), empty) and (out[empty] == 0).all()
    rel = float((out - ref_out).norm() / ref_out.norm())
    assert rel <= OUT_TOL[dtype], f"out rel err {rel:.2e}"
    fin = ~empty
    rel_lse = float((lse[fin] - ref_lse[fin]).norm() / ref_lse[fin].norm())
    assert rel_lse <= LSE_TOL[dtype], f"lse rel err {rel_lse:.2e}"
    # the reference path of the wrapper reads the same rows
    ref2, _ = sparse_attn(q, rows, idx, sink, scale, kv_layout=layout, backend="reference")
    assert float((ref2.double().cpu() - ref_out).norm() / ref_out.norm()) <= OUT_TOL[dtype]


def test_sparse_attn_rejects_rows_of_another_layout():
    layout = KVRowLayout(96, 32, torch.float32)
    q, idx, sink = torch.zeros(1, 16, 96), torch.zeros(1, 4, dtype=torch.int32), torch.zeros(16)
    with pytest.raises(ValueError, match=r"kv must be uint8 \[\.\.\., 200\]"):
        sparse_attn(q, torch.zeros(8, 192, dtype=torch.uint8), idx, sink, 0.1, kv_layout=layout)
    with pytest.raises(ValueError, match="head_dim 64"):
        sparse_attn(torch.zeros(1, 16, 64), torch.zeros(8, 200, dtype=torch.uint8), idx, sink, 0.1, kv_layout=layout)


@triton.jit
def _decode_both(code_ptr, sbyte_ptr, cvt_ptr, bits_ptr, N: tl.constexpr, DTYPE: tl.constexpr):
    offs = tl.arange(0, N)
    code = tl.load(code_ptr + offs)
    sbyte = tl.load(sbyte_ptr + offs)
    tl.store(cvt_ptr + offs, _e4m3fn_cvt(code, sbyte, DTYPE))
    tl.store(bits_ptr + offs, _e4m3fn_dequant(code.to(tl.int32), sbyte).to(DTYPE))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_e4m3fn_cvt_equals_the_bit_decode(dtype, device):
    """The FP8-conversion decode (`_e4m3fn_cvt`, sparse attention's dequant="cvt") gives every e4m3fn code (NaN codes
    aside) times every scale the model can store exactly as the integer decode and torch do, in each dot dtype."""
    codes = torch.tensor([c for c in range(256) if c & 0x7F != 0x7F], dtype=torch.uint8)
    # ue8m0 bytes of the scales the pack writes (2^−22 … 2^15 here) and 1 (the rope chunk's 127); fp16 only where
    # every product is an fp16 number
    sbytes = [105, 112, 119, 127, 134, 142] if dtype != torch.float16 else [112, 119, 127, 130]
    code = codes.repeat(len(sbytes))
    sbyte = torch.tensor(sbytes, dtype=torch.int32).repeat_interleave(len(codes))
    n = code.numel()
    pad = triton.next_power_of_2(n) - n
    code = torch.cat([code, torch.zeros(pad, dtype=torch.uint8)])
    sbyte = torch.cat([sbyte, torch.full((pad,), 127, dtype=torch.int32)])
    cvt = torch.full(code.shape, float("nan"), dtype=dtype, device=device)
    bits = torch.full(code.shape, float("nan"), dtype=dtype, device=device)
    _decode_both[(1,)](code.to(device), sbyte.to(device), cvt, bits, N=code.numel(), DTYPE={
        torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}[dtype])
    want = (code.view(torch.float8_e4m3fn).double() * torch.exp2(sbyte.double() - 127)).to(dtype)
    assert same_bits(cvt.cpu(), want), f"{int((cvt.cpu() != want).sum())} values differ"
    assert same_bits(bits.cpu(), want)
