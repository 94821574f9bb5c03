"""FP8 KV rows: the serving format of the main KV cache (SWA rings, scratch rows, compressed rows).

The model rounds the nope dims of every KV latent and compressed entry to FP8 e4m3 with one power-of-two
scale per 64 values before it stores them (docs/dsv4-spec.md "Attention layer" step 2, "Compressor"), so a
row can hold exactly those numbers in about half the bytes of bf16. One row, `KVRowLayout`:

    bytes [0, nope)                      nope dims as e4m3fn codes (OCP e4m3, on every platform)
    bytes [nope, nope + rope·es)         rope dims in `rope_dtype` (the model's dtype: bf16 on the V4 presets)
    bytes [scale_offset, + nope/64)      one ue8m0 scale byte per 64 nope dims: the fp32 exponent field,
                                         scale = 2^(byte − 127)
    zero padding to row_bytes, a multiple of 8

    value[c] = e4m3fn(code[c]) · 2^(scale_byte[c // 64] − 127)        for c < nope
    value[c] = rope[c − nope]                                           for nope ≤ c < head_dim

V4 (head_dim 512, rope 64, bf16): 448 + 128 + 7 scale bytes + 1 pad = 584 bytes against 1024 in bf16.
The scale of a block is 2^ceil(log2(max(amax, 1e-4) / 448)), the model's rounding, so packing a row the
model already rounded stores the same numbers (a block whose rounded amax fell to the next binade may take
half the scale: its codes are then twice the values, still exact), and `unpack(pack(x)) == x` bit for bit.
e4m3fn codes are decoded by integer arithmetic in registers (kernels/sparse_attention.py), the same on NVIDIA,
AMD (whose MI300 native FP8 is e4m3fnuz) and the interpreter, or (a launch variant: `_e4m3fn_cvt`) by the FP8
conversion as float8e4nv.

API (`backend` as in kernels/device.py):
    KVRowLayout(head_dim, rope_dim, rope_dtype)           the layout; .row_bytes, .nope_dim, offsets
    pack_kv_rows(x, layout, out=None, *, backend="auto")  x [N, head_dim] float → rows [N, row_bytes] uint8
    pack_kv_rows_ref(x, layout, out=None)                 plain PyTorch, the same bytes
    unpack_kv_rows(rows, layout) -> [N, head_dim] rope_dtype (plain PyTorch; the readers dequantize in registers)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from sparsepd.kernels.device import Backend, pick_backend

FP8_BLOCK = 64
FP8_MAX = 448.0  # e4m3fn
AMAX_FLOOR = 1e-4
ROW_ALIGN = 8
_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


@dataclass(frozen=True, slots=True)
class KVRowLayout:
    """Byte layout of one FP8 KV row (module docstring)."""

    head_dim: int
    rope_dim: int
    rope_dtype: torch.dtype

    def __post_init__(self) -> None:
        if self.rope_dtype not in _FLOAT_DTYPES:
            raise ValueError(f"rope_dtype must be bf16, fp16 or fp32, got {self.rope_dtype}")
        if not 0 < self.rope_dim < self.head_dim or (self.head_dim - self.rope_dim) % FP8_BLOCK:
            raise ValueError(f"nope dims head_dim − rope_dim = {self.head_dim} − {self.rope_dim} must be a positive "
                             f"multiple of {FP8_BLOCK}")

    @property
    def nope_dim(self) -> int:
        return self.head_dim - self.rope_dim

    @property
    def num_scales(self) -> int:
        return self.nope_dim // FP8_BLOCK

    @property
    def rope_bytes(self) -> int:
        return torch.finfo(self.rope_dtype).bits // 8

    @property
    def scale_offset(self) -> int:
        return self.nope_dim + self.rope_dim * self.rope_bytes

    @property
    def row_bytes(self) -> int:
        return -(-(self.scale_offset + self.num_scales) // ROW_ALIGN) * ROW_ALIGN

    def launch_args(self) -> dict:
        """The constexprs a kernel reading or writing these rows takes (offsets of the rope view in elements)."""
        es = self.rope_bytes
        return dict(NOPE=self.nope_dim, ROW_BYTES=self.row_bytes, SCALE_OFF=self.scale_offset,
                    ROW_E=self.row_bytes // es, ROPE_OFF_E=self.nope_dim // es)

    def rope_view(self, rows: torch.Tensor) -> torch.Tensor:
        """The same bytes seen as rope_dtype elements `[..., row_bytes / es]` (what kernels store rope dims through)."""
        return rows.view(self.rope_dtype)


def check_rows(rows: torch.Tensor, layout: KVRowLayout, name: str = "rows") -> None:
    if not isinstance(rows, torch.Tensor) or rows.dtype != torch.uint8 or rows.shape[-1] != layout.row_bytes:
        raise ValueError(f"{name} must be uint8 [..., {layout.row_bytes}] FP8 KV rows, got "
                         f"{getattr(rows, 'dtype', type(rows))} {tuple(getattr(rows, 'shape', ()))}")
    if rows.stride(-1) != 1 or (rows.dim() > 1 and rows.stride(-2) != layout.row_bytes):
        raise ValueError(f"{name} rows must be contiguous, got strides {rows.stride()}")


# ----------------------------------------------------------------------------------------------------
# e4m3 arithmetic on fp32 bits (exact on every platform and in the interpreter)


@triton.jit
def _e4m3_round(v, EXP_BIAS: tl.constexpr, SUB_STEP: tl.constexpr):
    """v (fp32, |v| ≤ the format's max) rounded to nearest even on the e4m3 grid, as fp32.
    SUB_STEP = 2^(−EXP_BIAS−2), the spacing below the smallest normal."""
    bits = v.to(tl.int32, bitcast=True)
    mag = bits & 0x7FFFFFFF
    exp = mag >> 23
    normal = ((mag + 0x7FFFF + ((mag >> 20) & 1)) & 0x7FF00000).to(tl.float32, bitcast=True)
    # below the smallest normal 2^(1−bias): multiples of 2^(−bias−2), m = rne(mantissa24 >> shift)
    mant = (mag & 0x7FFFFF) | 0x800000
    shift = tl.minimum(tl.maximum(148 - EXP_BIAS - exp, 1), 25)
    q = mant >> shift
    rem = mant & ((1 << shift) - 1)
    half = 1 << (shift - 1)
    q = q + ((rem > half) | ((rem == half) & ((q & 1) == 1))).to(tl.int32)
    sub = q.to(tl.float32) * SUB_STEP
    r = tl.where(exp < 128 - EXP_BIAS, sub, normal)
    return tl.where(bits < 0, -r, r)


@triton.jit
def _e4m3_code(r, EXP_BIAS: tl.constexpr, SUB_STEP: tl.constexpr, NO_NEG_ZERO: tl.constexpr):
    """The e4m3 byte (int32 in [0, 255]) of r, a value already on the grid (`_e4m3_round`)."""
    bits = r.to(tl.int32, bitcast=True)
    mag = bits & 0x7FFFFFFF
    exp = mag >> 23
    normal = ((exp - 127 + EXP_BIAS) << 3) | ((mag >> 20) & 7)
    sub = (mag.to(tl.float32, bitcast=True) / SUB_STEP).to(tl.int32)  # exact: SUB_STEP is a power of two
    code = tl.where(exp < 128 - EXP_BIAS, sub, normal)
    sign = (bits >> 24) & 0x80
    if NO_NEG_ZERO:
        sign = tl.where(code == 0, 0, sign)
    return sign | code


@triton.jit
def _pow2_scale(amax, FP8_MAX: tl.constexpr, UE8M0: tl.constexpr):
    """max(amax, 1e-4) / FP8_MAX, rounded up to a power of two when UE8M0 (on the bits: a normal number)."""
    scale = tl.math.div_rn(tl.maximum(amax, 1e-4), FP8_MAX)
    if UE8M0:
        sb = scale.to(tl.int32, bitcast=True)
        sb = (sb & 0x7F800000) + tl.where((sb & 0x7FFFFF) != 0, 0x800000, 0)
        scale = sb.to(tl.float32, bitcast=True)
    return scale


@triton.jit
def _e4m3fn_dequant(code, scale_byte):
    """e4m3fn code (int32 [0, 255]) times 2^(scale_byte − 127), as fp32, exactly: the code's bits moved into an
    fp16 (sign, then exponent and mantissa shifted by 7: fp16's subnormals cover e4m3's), which is the value
    times 2^−8, so the scale carries 2^8 (exponent field scale_byte + 8)."""
    h = (((code & 0x80) << 8) | ((code & 0x7F) << 7)).to(tl.int16).to(tl.float16, bitcast=True)
    return h.to(tl.float32) * ((scale_byte + 8) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _e4m3fn_cvt(code, scale_byte, DTYPE: tl.constexpr):
    """`_e4m3fn_dequant` by the FP8 conversion, cast to DTYPE: the code (uint8) seen as float8e4nv and converted
    (sm_90: one cvt.rn.f16x2.e4m3x2 for two codes, then f16 → f32), times 2^(scale_byte − 127) in fp32 (exact),
    then cast (two values a cvt for bf16). fp32 rather than bf16 arithmetic: bf16 from f16 is a cvt.bf16.f16 per
    value on sm_90, fp16 may not hold the scale, and the interpreter's bf16 multiply is not real. A scale byte of 0
    gives 0 here, 2^−127 there: the model's scales are ≥ 2^−22. Codes 0x7F/0xFF (NaN) never occur in FP8 KV rows
    (the pack clamps to ±448)."""
    f8 = code.to(tl.float8e4nv, bitcast=True)
    return (f8.to(tl.float32) * (scale_byte << 23).to(tl.float32, bitcast=True)).to(DTYPE)


@triton.jit
def _store_fp8_row(out_ptr, rope_ptr, dst, ok, y, c,
                   D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                   NOPE: tl.constexpr, ROW_BYTES: tl.constexpr, SCALE_OFF: tl.constexpr,
                   ROW_E: tl.constexpr, ROPE_OFF_E: tl.constexpr):
    """Store rows y [BLOCK_M, BLOCK_D] (fp32; columns ≥ D ignored) as FP8 KV rows at row ids dst [BLOCK_M] where ok:
    out_ptr is the uint8 view, rope_ptr the rope-dtype view of the same rows."""
    NB: tl.constexpr = BLOCK_D // 64
    g = tl.reshape(y, [BLOCK_M, NB, 64])
    scale = _pow2_scale(tl.max(tl.abs(g), axis=2), 448.0, True)  # [M, NB]
    v = tl.minimum(tl.maximum(tl.math.div_rn(g, scale[:, :, None]), -448.0), 448.0)
    code = tl.reshape(_e4m3_code(_e4m3_round(v, 7, 0.001953125), 7, 0.001953125, False), [BLOCK_M, BLOCK_D])
    row = dst.to(tl.int64)[:, None]
    nope = c < NOPE
    tl.store(out_ptr + row * ROW_BYTES + c[None, :], code.to(tl.uint8), mask=ok[:, None] & nope[None, :])
    rope = (c >= NOPE) & (c < D)
    tl.store(rope_ptr + row * ROW_E + (ROPE_OFF_E - NOPE) + c[None, :], y.to(rope_ptr.dtype.element_ty),
             mask=ok[:, None] & rope[None, :])
    blk = tl.arange(0, NB)
    sbyte = (scale.to(tl.int32, bitcast=True) >> 23) & 0xFF
    tl.store(out_ptr + row * ROW_BYTES + SCALE_OFF + blk[None, :], sbyte.to(tl.uint8),
             mask=ok[:, None] & (blk < NOPE // 64)[None, :])
    PAD: tl.constexpr = ROW_BYTES - SCALE_OFF - NOPE // 64  # < 8
    pad = tl.arange(0, 8)
    tl.store(out_ptr + row * ROW_BYTES + (SCALE_OFF + NOPE // 64) + pad[None, :], tl.zeros([BLOCK_M, 8], tl.uint8),
             mask=ok[:, None] & (pad < PAD)[None, :])


@triton.jit
def _pack_kernel(x_ptr, out_ptr, rope_ptr, n_rows, stride_x,
                 D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                 NOPE: tl.constexpr, ROW_BYTES: tl.constexpr, SCALE_OFF: tl.constexpr,
                 ROW_E: tl.constexpr, ROPE_OFF_E: tl.constexpr):
    r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    c = tl.arange(0, BLOCK_D)
    ok = r < n_rows
    y = tl.load(x_ptr + r.to(tl.int64)[:, None] * stride_x + c[None, :], mask=ok[:, None] & (c < D)[None, :],
                other=0.0).to(tl.float32)
    _store_fp8_row(out_ptr, rope_ptr, r, ok, y, c, D, BLOCK_M, BLOCK_D, NOPE, ROW_BYTES, SCALE_OFF, ROW_E, ROPE_OFF_E)


# ----------------------------------------------------------------------------------------------------
# wrappers and references


def _check_pack(x: torch.Tensor, layout: KVRowLayout, out: torch.Tensor | None) -> None:
    if not isinstance(layout, KVRowLayout):
        raise TypeError(f"layout must be a KVRowLayout, got {type(layout).__name__}")
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != layout.head_dim or x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x must be a bf16/fp16/fp32 [N, {layout.head_dim}] tensor, got "
                         f"{getattr(x, 'dtype', type(x))} {tuple(getattr(x, 'shape', ()))}")
    if x.stride(1) != 1:
        raise ValueError(f"x must be contiguous in its last dim, got strides {x.stride()}")
    if out is not None:
        check_rows(out, layout, "out")
        if out.shape != (x.shape[0], layout.row_bytes) or out.device != x.device:
            raise ValueError(f"out must be [{x.shape[0]}, {layout.row_bytes}] on {x.device}, got "
                             f"{tuple(out.shape)} on {out.device}")


def pack_kv_rows(x: torch.Tensor, layout: KVRowLayout, out: torch.Tensor | None = None, *,
                 backend: Backend = "auto") -> torch.Tensor:
    """FP8 KV rows [N, row_bytes] uint8 of x [N, head_dim] (module docstring); written into out when given."""
    _check_pack(x, layout, out)
    if out is None:
        out = torch.empty(x.shape[0], layout.row_bytes, dtype=torch.uint8, device=x.device)
    if pick_backend(backend, x, out) == "reference":
        return pack_kv_rows_ref(x, layout, out)
    n = x.shape[0]
    if n == 0:
        return out
    block_m = 4
    _pack_kernel[(triton.cdiv(n, block_m),)](
        x, out, layout.rope_view(out), n, x.stride(0),
        D=layout.head_dim, BLOCK_M=block_m, BLOCK_D=max(64, triton.next_power_of_2(layout.head_dim)),
        **layout.launch_args(), num_warps=4)
    return out


def pack_kv_rows_ref(x: torch.Tensor, layout: KVRowLayout, out: torch.Tensor | None = None) -> torch.Tensor:
    _check_pack(x, layout, out)
    n, nope = x.shape[0], layout.nope_dim
    g = x[:, :nope].float().unflatten(-1, (layout.num_scales, FP8_BLOCK))
    scale = g.abs().amax(-1, keepdim=True).clamp_min(AMAX_FLOOR) / FP8_MAX
    mantissa, exponent = torch.frexp(scale)  # power of two ≥ scale: 2^(e−1) when exact, else 2^e
    scale = torch.ldexp(torch.ones_like(scale), torch.where(mantissa == 0.5, exponent - 1, exponent))
    codes = (g / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).view(torch.uint8).flatten(1)
    rows = torch.zeros(n, layout.row_bytes, dtype=torch.uint8, device=x.device)
    rows[:, :nope] = codes
    rows[:, nope: layout.scale_offset] = x[:, nope:].to(layout.rope_dtype).contiguous().view(torch.uint8)
    rows[:, layout.scale_offset: layout.scale_offset + layout.num_scales] = (
        (scale.squeeze(-1).view(torch.int32) >> 23) & 0xFF).to(torch.uint8)
    if out is None:
        return rows
    return out.copy_(rows)


def unpack_kv_rows(rows: torch.Tensor, layout: KVRowLayout) -> torch.Tensor:
    """The values of FP8 KV rows [..., row_bytes] as [..., head_dim] in rope_dtype (exact: every nope value is an
    e4m3 value times a power of two)."""
    check_rows(rows, layout)
    nope = layout.nope_dim
    codes = rows[..., :nope].contiguous().view(torch.float8_e4m3fn).float()
    sbytes = rows[..., layout.scale_offset: layout.scale_offset + layout.num_scales].to(torch.int32)
    scale = (sbytes << 23).view(torch.float32)
    values = (codes.unflatten(-1, (layout.num_scales, FP8_BLOCK)) * scale[..., None]).flatten(-2)
    rope = rows[..., nope: layout.scale_offset].contiguous().view(layout.rope_dtype)
    return torch.cat([values.to(layout.rope_dtype), rope], dim=-1)


__all__ = ["KVRowLayout", "check_rows", "pack_kv_rows", "pack_kv_rows_ref", "unpack_kv_rows"]
