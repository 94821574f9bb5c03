"""Manifold-constrained hyper-connections (mHC) around each sublayer, fused for the GPU.

docs/dsv4-spec.md "Block, MoE and head". The residual stream is hc copies x `[n, hc, dim]`; with K = hc·dim:

    mixes  = (flatten(x) @ fn^T) · rsqrt(mean(flatten(x)²) + norm_eps)         [n, mix], mix = (2+hc)·hc
    pre    = sigmoid(mixes[:hc]·scale0 + base[:hc]) + eps                       [n, hc]
    post   = 2·sigmoid(mixes[hc:2hc]·scale1 + base[hc:2hc])                     [n, hc]
    comb   = softmax_j(mixes[2hc:]·scale2 + base[2hc:]) + eps, then Sinkhorn:   [n, hc(i), hc(j)]
             divide by the column sums, then rows and columns alternately (`iters` normalisations in all)
    hc_pre:  sub_input = Σ_i pre_i·x_i                                          [n, dim] in x.dtype
    hc_post: y_j = post_j·f + Σ_i comb_ij·x_i                                   [n, hc, dim] in x.dtype
    hc_head: Σ_i (sigmoid(mixes·scale0 + base) + eps)_i·x_i with mix = hc      [n, dim] in x.dtype

API (`backend` as in kernels/device.py; `*_ref` have the same signatures without it):
    hc_pre_fused(x, fn, scale, base, iters, eps, norm_eps) -> (sub_input, post fp32, comb fp32)
    hc_post_fused(f, x, post, comb) -> y
    hc_head_fused(x, fn, scale, base, eps, norm_eps) -> out
x, f: fp32/fp16/bf16 `[n, hc, dim]` / `[n, dim]`, contiguous; fn `[mix, hc·dim]`, scale, base, post, comb fp32.

Kernels (hc_pre and hc_head: two launches; hc_post: one):
  _mix_kernel   grid (token blocks, K splits): x_flat·fn^T and Σx² of one K chunk for BLOCK_N tokens into a
                partial buffer `[splits, n, MIX_PAD]` (mix padded to ≥16 for tl.dot, Σx² in column `mix`).
                Splitting K keeps ~TARGET_PROGRAMS programs busy for decode batches (one token reads all of
                fn: 24×16384 fp32 = 1.5 MiB for the real model). tl.dot runs fp32 operands as bf16x6 on GPUs
                (error ≈ fp32's; see _dot_precision), IEEE fp32 in the interpreter.
  _apply_kernel grid (tokens, dim blocks): sums the splits, sigmoid/softmax/Sinkhorn on the token's mix
                values in registers (each dim block recomputes them: ~600 flops, cheaper than a launch), the
                weighted collapse of its dim block; the first dim block writes post and comb.
  _post_kernel  grid (tokens, dim blocks): y = post·f + comb^T·x for one dim block.

Measured on an H200 (dim 4096, hc 4, bf16 x, CUDA-graph replay; the same call through the torch reference
on the GPU in brackets; floor = bytes moved at 4.3 TB/s):
    n=1:    hc_pre 9.3 µs (211), hc_post 1.9 µs (14),  hc_head 6.0 µs (28)     floor 0.4 µs
    n=256:  hc_pre 16 µs (334),  hc_post 5.4 µs (126), hc_head 11 µs (104)     floor 4.8 µs
    n=8192: hc_pre 256 µs (2334), hc_post 160 µs (3694), hc_head 216 µs (2073) floor 141 µs

The reference (`*_ref`) is the model's CPU path, bit for bit as before it moved here: the GEMM pads small
inputs to MIN_ROWS rows and sigmoid/softmax go through float64 on the CPU (batch invariance, see
model/numerics.py, whose helpers are mirrored below because kernels/ may not import model/). Given
float64 inputs it evaluates the formula in float64 (the tests' exact value).

Limits: hc a power of two ≤ 16; iters ≥ 1; x, f fp32/fp16/bf16 (fp64 only through the reference). The
Triton path sums K in a split count chosen from n, so on the GPU a token's mixes may differ in the last bits
between batch sizes (deterministic for a given n: no atomics), unlike the batch-invariant CPU reference.
bf16x6 needs a Triton that knows it (3.6 does); measured on NVIDIA only (Triton 3.6 lists it for AMD too).
Decode-sized calls are latency-bound (two dependent launches, 39 serial [hc, hc] normalisations), not
bandwidth-bound.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from sparsepd.kernels.device import Backend, pick_backend

MIN_ROWS = 32  # model/numerics.py's MIN_ROWS (tests/kernels/test_hyper.py checks they agree)
TARGET_PROGRAMS = 512  # ~4 programs per SM on an H100/H200 (132 SMs) for the K-split GEMM
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --- reference (the CPU path) ----------------------------------------------------------------------
def _linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight^T for 2-D x, batch-invariant on the CPU (model/numerics.py `linear`)."""
    n = x.shape[0]
    flat = x.to(weight.dtype)
    if flat.device.type == "cpu" and n < MIN_ROWS:
        flat = torch.cat([flat, flat.new_zeros(MIN_ROWS - n, flat.shape[1])])
    return F.linear(flat, weight)[:n]


def _via_f64(fn, x: torch.Tensor) -> torch.Tensor:
    """fn in float64 rounded once to fp32 on the CPU, fp32 on the GPU (model/numerics.py `_via_f64`)."""
    if x.dtype == torch.float64:
        return fn(x)
    if x.is_cuda:
        return fn(x.float())
    return fn(x.double()).to(torch.float32)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _mixes_ref(x: torch.Tensor, fn: torch.Tensor, norm_eps: float) -> torch.Tensor:
    flat = x.flatten(1).to(_compute_dtype(x))
    return _linear(flat, fn) * torch.rsqrt(flat.square().mean(-1, keepdim=True) + norm_eps)


def split_sinkhorn_ref(mixes: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, hc: int, iters: int,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """pre `[n, hc]`, post `[n, hc]`, comb `[n, hc, hc]` from mixes `[n, (2+hc)·hc]` fp32."""
    pre = _via_f64(torch.sigmoid, mixes[:, :hc] * scale[0] + base[:hc]) + eps
    post = 2 * _via_f64(torch.sigmoid, mixes[:, hc: 2 * hc] * scale[1] + base[hc: 2 * hc])
    logits = mixes[:, 2 * hc:].unflatten(-1, (hc, hc)) * scale[2] + base[2 * hc:].view(hc, hc)
    comb = _via_f64(lambda t: t.softmax(-1), logits) + eps
    comb = comb / (comb.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(-1, keepdim=True) + eps)
        comb = comb / (comb.sum(-2, keepdim=True) + eps)
    return pre, post, comb


def hc_pre_ref(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, iters: int, eps: float,
               norm_eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    mixes = _mixes_ref(x, fn, norm_eps)
    pre, post, comb = split_sinkhorn_ref(mixes, scale, base, x.shape[1], iters, eps)
    return (pre[:, :, None] * x.to(_compute_dtype(x))).sum(1).to(x.dtype), post, comb


def hc_post_ref(f: torch.Tensor, x: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    ct = _compute_dtype(x)
    y = post[:, :, None] * f.to(ct)[:, None, :] + (comb[:, :, :, None] * x.to(ct)[:, :, None, :]).sum(1)
    return y.to(x.dtype)


def hc_head_ref(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, eps: float,
                norm_eps: float) -> torch.Tensor:
    pre = _via_f64(torch.sigmoid, _mixes_ref(x, fn, norm_eps) * scale + base) + eps
    return (pre[:, :, None] * x.to(_compute_dtype(x))).sum(1).to(x.dtype)


# --- Triton ------------------------------------------------------------------------------------------
@triton.jit
def _mix_kernel(x_ptr, fn_ptr, part_ptr, n, K, chunk, MIX: tl.constexpr, MIX_PAD: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """part[s, t, :MIX] = x_flat[t, chunk s] · fn[:, chunk s]^T; part[s, t, MIX] = Σ x_flat[t, chunk s]²."""
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    split = tl.program_id(1)
    cols = tl.arange(0, MIX_PAD)
    row_ok = rows < n
    acc = tl.zeros([BLOCK_N, MIX_PAD], tl.float32)
    sumsq = tl.zeros([BLOCK_N], tl.float32)
    for k0 in range(split * chunk, split * chunk + chunk, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        xt = tl.load(x_ptr + rows[:, None] * K + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        xt = xt.to(tl.float32)  # [BLOCK_N, BLOCK_K]
        ft = tl.load(fn_ptr + cols[:, None] * K + k[None, :], mask=(cols < MIX)[:, None] & k_ok[None, :], other=0.0)
        acc += tl.dot(xt, tl.trans(ft), input_precision=PRECISION)  # per-tile sum, then fp32 add
        sumsq += tl.sum(xt * xt, 1)
    acc = tl.where(cols[None, :] == MIX, sumsq[:, None], acc)
    tl.store(part_ptr + (split * n + rows)[:, None] * MIX_PAD + cols[None, :], acc, mask=row_ok[:, None])


@triton.jit
def _apply_kernel(x_ptr, part_ptr, scale_ptr, base_ptr, out_ptr, post_ptr, comb_ptr, n, dim, splits, iters,
                  eps, norm_eps, HC: tl.constexpr, MIX: tl.constexpr, MIX_PAD: tl.constexpr,
                  SPLITS_PAD: tl.constexpr, BLOCK_D: tl.constexpr, HEAD: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    s = tl.arange(0, SPLITS_PAD)
    s_ok = s < splits
    row = (s.to(tl.int64) * n + t) * MIX_PAD  # [SPLITS_PAD]: this token's partial rows
    i = tl.arange(0, HC)
    K = HC * dim
    r = tl.rsqrt(tl.sum(tl.load(part_ptr + row + MIX, mask=s_ok, other=0.0), 0) / K + norm_eps)
    mix_pre = tl.sum(tl.load(part_ptr + row[:, None] + i[None, :], mask=s_ok[:, None], other=0.0), 0) * r
    pre = tl.sigmoid(mix_pre * tl.load(scale_ptr) + tl.load(base_ptr + i)) + eps  # [HC]
    if not HEAD:
        if pid_d == 0:
            mix_post = tl.sum(tl.load(part_ptr + row[:, None] + HC + i[None, :], mask=s_ok[:, None], other=0.0), 0)
            post = 2 * tl.sigmoid(mix_post * r * tl.load(scale_ptr + 1) + tl.load(base_ptr + HC + i))
            tl.store(post_ptr + t * HC + i, post)
            ij = i[:, None] * HC + i[None, :]  # [HC(i), HC(j)]
            raw = tl.sum(tl.load(part_ptr + row[:, None, None] + 2 * HC + ij[None, :, :],
                                 mask=s_ok[:, None, None], other=0.0), 0)
            logits = raw * r * tl.load(scale_ptr + 2) + tl.load(base_ptr + 2 * HC + ij)
            e = tl.exp(logits - tl.max(logits, 1)[:, None])
            comb = e / tl.sum(e, 1)[:, None] + eps
            comb = comb / (tl.sum(comb, 0)[None, :] + eps)
            for _ in range(iters - 1):
                comb = comb / (tl.sum(comb, 1)[:, None] + eps)
                comb = comb / (tl.sum(comb, 0)[None, :] + eps)
            tl.store(comb_ptr + t * HC * HC + ij, comb)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < dim
    xt = tl.load(x_ptr + t * K + i[:, None] * dim + d[None, :], mask=d_ok[None, :], other=0.0).to(tl.float32)
    out = tl.sum(pre[:, None] * xt, 0)
    tl.store(out_ptr + t * dim + d, out.to(out_ptr.dtype.element_ty), mask=d_ok)


@triton.jit
def _post_kernel(f_ptr, x_ptr, post_ptr, comb_ptr, y_ptr, dim, HC: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < dim
    i = tl.arange(0, HC)
    offs = t * HC * dim + i[:, None] * dim + d[None, :]  # [HC, BLOCK_D]
    xt = tl.load(x_ptr + offs, mask=d_ok[None, :], other=0.0).to(tl.float32)
    f = tl.load(f_ptr + t * dim + d, mask=d_ok, other=0.0).to(tl.float32)
    comb = tl.load(comb_ptr + t * HC * HC + i[:, None] * HC + i[None, :])  # [HC(i), HC(j)]
    post = tl.load(post_ptr + t * HC + i)
    y = post[:, None] * f[None, :] + tl.sum(comb[:, :, None] * xt[:, None, :], 0)  # [HC(j), BLOCK_D]
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=d_ok[None, :])


# --- wrappers --------------------------------------------------------------------------------------
def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer the Triton path writes (the tests replace this to poison them with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _check_stream(x: torch.Tensor) -> None:
    _need(isinstance(x, torch.Tensor) and x.dim() == 3, f"x must be a [n, hc, dim] tensor, got {_shape(x)}")
    hc = x.shape[1]
    _need(hc >= 1 and hc & (hc - 1) == 0 and hc <= 16, f"hc (x.shape[1]) must be a power of two ≤ 16, got {hc}")


def _check_mix_params(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, mix: int,
                      n_scale: int) -> None:
    k = x.shape[1] * x.shape[2]
    _need(fn.shape == (mix, k), f"fn must be [{mix}, {k}] (mix, hc·dim), got {_shape(fn)}")
    _need(scale.shape == (n_scale,), f"scale must be [{n_scale}], got {_shape(scale)}")
    _need(base.shape == (mix,), f"base must be [{mix}], got {_shape(base)}")


def _check_triton(named: dict[str, torch.Tensor], low_precision: tuple[str, ...]) -> None:
    device = next(iter(named.values())).device
    for name, t in named.items():
        _need(t.device == device, f"{name} is on {t.device}, expected {device}")
        _need(t.is_contiguous(), f"{name} must be contiguous, got strides {t.stride()}")
        allowed = _DTYPES if name in low_precision else (torch.float32,)
        _need(t.dtype in allowed, f"{name} must be one of {allowed}, got {t.dtype}")


def _shape(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def _dot_precision(device: torch.device) -> str:
    """The fp32 GEMM's tl.dot precision: bf16x6 on GPUs (each fp32 operand split into three bf16 parts, six
    tensor-core products, error ≈ fp32's), IEEE in the interpreter (which knows no bf16x6). On an H200 at
    n=8192 (bf16 x): IEEE FMA 1300 µs, tf32x3 277 µs, bf16x6 163 µs; max |mixes| error 2.2e-5, 1.1e-6,
    7.9e-7 against fp32 cuBLAS's 6.6e-6."""
    return "bf16x6" if device.type == "cuda" else "ieee"


def _mix_blocks(n: int, k: int) -> tuple[int, int, int, int, int]:
    """BLOCK_N, BLOCK_K, K chunk per split, number of splits, num_warps: enough programs at any n
    (measured on an H200 at dim 4096: 3.8 µs at n=1, 8 µs at 256, 163 µs at 8192 for bf16 x)."""
    block_n, block_k, num_warps = (16, 128, 4) if n <= 16 else (64, 64, 4) if n <= 1024 else (128, 64, 8)
    max_splits = min(triton.cdiv(k, block_k), 128)
    splits = max(1, min(max_splits, triton.cdiv(TARGET_PROGRAMS, triton.cdiv(n, block_n))))
    chunk = triton.cdiv(triton.cdiv(k, splits), block_k) * block_k
    return block_n, block_k, chunk, triton.cdiv(k, chunk), num_warps


def _block_d(n: int, dim: int) -> int:
    """dim block of the apply and post kernels (both run one warp a program: fastest on an H200 at any n)."""
    return min(triton.next_power_of_2(dim), 256 if n <= 16 else 1024)


def _launch_pre(x, fn, scale, base, iters, eps, norm_eps, head: bool):
    n, hc, dim = x.shape
    mix, k = fn.shape
    out = _empty((n, dim), x.dtype, x.device)
    post = _empty((n, 0 if head else hc), torch.float32, x.device)
    comb = _empty((n, 0 if head else hc, 0 if head else hc), torch.float32, x.device)
    if n == 0:
        return out, post, comb
    mix_pad = max(16, triton.next_power_of_2(mix + 1))
    block_n, block_k, chunk, splits, num_warps = _mix_blocks(n, k)
    part = _empty((splits, n, mix_pad), torch.float32, x.device)
    _mix_kernel[(triton.cdiv(n, block_n), splits)](x, fn, part, n, k, chunk, MIX=mix, MIX_PAD=mix_pad,
                                                   BLOCK_N=block_n, BLOCK_K=block_k,
                                                   PRECISION=_dot_precision(x.device), num_warps=num_warps)
    block_d = _block_d(n, dim)
    _apply_kernel[(n, triton.cdiv(dim, block_d))](
        x, part, scale, base, out, out if head else post, out if head else comb, n, dim, splits, iters,
        eps, norm_eps, HC=hc, MIX=mix, MIX_PAD=mix_pad, SPLITS_PAD=triton.next_power_of_2(splits),
        BLOCK_D=block_d, HEAD=head, num_warps=1)  # one warp: Sinkhorn's [hc, hc] sums stay in-warp
    return out, post, comb


def hc_pre_fused(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, iters: int,
                 eps: float, norm_eps: float, *, backend: Backend = "auto"
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sublayer input `[n, dim]` (x.dtype), post `[n, hc]` and comb `[n, hc, hc]` (fp32) from x `[n, hc, dim]`."""
    _check_stream(x)
    hc = x.shape[1]
    _check_mix_params(x, fn, scale, base, (2 + hc) * hc, 3)
    _need(isinstance(iters, int) and iters >= 1, f"iters must be an int ≥ 1, got {iters!r}")
    if pick_backend(backend, x, fn, scale, base) == "reference":
        return hc_pre_ref(x, fn, scale, base, iters, eps, norm_eps)
    _check_triton({"x": x, "fn": fn, "scale": scale, "base": base}, ("x",))
    return _launch_pre(x, fn, scale, base, iters, float(eps), float(norm_eps), head=False)


def hc_head_fused(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, eps: float,
                  norm_eps: float, *, backend: Backend = "auto") -> torch.Tensor:
    """The hc copies mixed into one `[n, dim]` (x.dtype) before the final norm."""
    _check_stream(x)
    _check_mix_params(x, fn, scale, base, x.shape[1], 1)
    if pick_backend(backend, x, fn, scale, base) == "reference":
        return hc_head_ref(x, fn, scale, base, eps, norm_eps)
    _check_triton({"x": x, "fn": fn, "scale": scale, "base": base}, ("x",))
    return _launch_pre(x, fn, scale, base, 1, float(eps), float(norm_eps), head=True)[0]


def hc_post_fused(f: torch.Tensor, x: torch.Tensor, post: torch.Tensor, comb: torch.Tensor, *,
                  backend: Backend = "auto") -> torch.Tensor:
    """New stream `[n, hc, dim]` (x.dtype): y_j = post_j · f + Σ_i comb_ij · x_i."""
    _check_stream(x)
    n, hc, dim = x.shape
    _need(isinstance(f, torch.Tensor) and f.shape == (n, dim), f"f must be [{n}, {dim}], got {_shape(f)}")
    _need(isinstance(post, torch.Tensor) and post.shape == (n, hc), f"post must be [{n}, {hc}], got {_shape(post)}")
    _need(isinstance(comb, torch.Tensor) and comb.shape == (n, hc, hc),
          f"comb must be [{n}, {hc}, {hc}], got {_shape(comb)}")
    if pick_backend(backend, f, x, post, comb) == "reference":
        return hc_post_ref(f, x, post, comb)
    _check_triton({"x": x, "f": f, "post": post, "comb": comb}, ("x", "f"))
    y = _empty((n, hc, dim), x.dtype, x.device)
    if n:
        block_d = _block_d(n, dim)
        _post_kernel[(n, triton.cdiv(dim, block_d))](f, x, post, comb, y, dim, HC=hc, BLOCK_D=block_d, num_warps=1)
    return y
