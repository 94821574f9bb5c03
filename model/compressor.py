"""The KV compressor of CSA/HCA layers and of the indexer (docs/dsv4-spec.md "Compressor").

Entry e pools block e (positions e·ratio … e·ratio+ratio−1) with a per-channel softmax gate over the
window; with overlap (ratio 4) the window is 2·ratio rows: the previous block's first d channels, then
this block's last d channels (padding before position 0). Then RMSNorm, RoPE at position e·ratio, and
the quantization the consumer of the entry sees (FP8 on the nope dims for the main KV; Hadamard rotation
and the indexer's quantization for indexer keys). Entry e is committed when position e·ratio+ratio−1 is
processed; positions not yet pooled live in the request's ring (`CompressorRing`, row p % state_size).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from sparsepd.kernels.compress_plan import build_compress_plan
from sparsepd.kernels.compressor import compress_indexer, compress_main
from sparsepd.kernels.indexer import ROW_BYTES as INDEX_ROW_BYTES
from sparsepd.kernels.indexer import dequantize_rows_fp8, indexer_cache_write, quantize_rows_fp8
from sparsepd.kernels.rms_norm import rms_norm as rms_norm_rows
from sparsepd.kernels.state_update import compressor_state_write
from sparsepd.model.numerics import (
    apply_rope,
    fp4_round_trip,
    fp8_round_trip,
    hadamard_rotate,
    linear,
    rope_cos_sin,
    softmax,
)
from sparsepd.model.state import CompressorRing

Output = Literal["main", "indexer"]


class RMSNorm(nn.Module):
    """model/numerics.py's rms_norm with a learned weight: one launch on a GPU (kernels/rms_norm.py), the
    PyTorch composition on the CPU."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm_rows(x, self.weight, self.eps)


class Compressor(nn.Module):
    def __init__(self, dim: int, head_dim: int, rope_dim: int, ratio: int, eps: float, output: Output,
                 quantize: str, act_dtype: torch.dtype):
        super().__init__()
        self.ratio, self.head_dim, self.rope_dim = ratio, head_dim, rope_dim
        self.overlap = ratio == 4
        self.coff = 2 if self.overlap else 1
        self.state_size = self.coff * ratio
        self.output, self.quantize, self.act_dtype = output, quantize, act_dtype
        width = self.coff * head_dim
        self.ape = nn.Parameter(torch.zeros(ratio, width), requires_grad=False)  # [ratio, coff*d] fp32
        self.wkv = nn.Linear(dim, width, bias=False, dtype=torch.float32).requires_grad_(False)
        self.wgate = nn.Linear(dim, width, bias=False, dtype=torch.float32).requires_grad_(False)
        self.norm = RMSNorm(head_dim, eps, act_dtype)

    def forward(self, x: torch.Tensor, start: int, ring: CompressorRing, freqs: torch.Tensor) -> torch.Tensor:
        """Project x `[n, dim]` (positions start…start+n−1), commit the entries whose block ends in this
        chunk and advance the ring. Returns the new entries `[m, head_dim]` (m ≥ 0) in entry order."""
        return self.commit(*self.project(x), start, ring, freqs)

    def commit(self, kv: torch.Tensor, score: torch.Tensor, start: int, ring: CompressorRing,
               freqs: torch.Tensor) -> torch.Tensor:
        """`forward` from projected rows (kv, score) `[n, coff*d]` of positions start…start+n−1."""
        if kv.is_cuda:
            return self._commit_with_kernels(kv, score, start, ring, freqs)
        n, ratio, size = kv.shape[0], self.ratio, self.state_size
        device = kv.device
        positions = torch.arange(start, start + n, device=device)
        score = score + self.ape[positions % ratio]
        # Rows for positions start−size … start+n−1: the ring's older positions, then this chunk.
        old = torch.arange(start - size, start, device=device)
        old_kv = torch.where((old >= 0)[:, None], ring.kv[old % size], 0.0)
        old_score = torch.where((old >= 0)[:, None], ring.score[old % size], float("-inf"))
        all_kv, all_score = torch.cat([old_kv, kv]), torch.cat([old_score, score])

        ends = positions[(positions + 1) % ratio == 0]  # positions that commit an entry
        entries = torch.div(ends + 1, ratio, rounding_mode="floor") - 1  # [m]
        pooled = self._pool(all_kv, all_score, entries * ratio - (start - size))

        ring.kv[positions[-size:] % size] = kv[-size:]
        ring.score[positions[-size:] % size] = score[-size:]
        return self._finish(pooled, entries * ratio, freqs)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token rows (kv, score) `[n, coff*d]` fp32; the positional bias `ape` is not yet added.

        The weights are fp32. On a GPU with bf16 activations, x·W is computed as x·W_hi + x·W_lo with W split
        into two bf16 parts (W_hi = bf16(W), W_lo = bf16(W − W_hi): W to ~2⁻¹⁶ relative, x exact in bf16): one
        bf16 GEMM with fp32 accumulation over [W_hi; W_lo] and one add, instead of an fp32 GEMM, which CUDA
        runs without tensor cores (the fp32 GEMMs took 8.2 ms, 14%, of an 8K-token `bench` prefill on an H100)."""
        if x.is_cuda and x.dtype == torch.bfloat16:
            return self._project_split(x, self.wkv.weight), self._project_split(x, self.wgate.weight)
        return linear(x.float(), self.wkv.weight), linear(x.float(), self.wgate.weight)

    def _project_split(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        parts = self._split_weight(weight)  # [2·width, dim] bf16: W_hi rows, then W_lo rows
        width = weight.shape[0]
        y = torch.mm(x.reshape(-1, x.shape[-1]), parts.t(), out_dtype=torch.float32)  # [n, 2·width]
        return (y[:, :width] + y[:, width:]).reshape(*x.shape[:-1], width)

    def _split_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """[bf16(W); bf16(W − bf16(W))], made once per weight version (on the first GPU forward, before any
        graph capture: the engine warms up first)."""
        cache = self.__dict__.setdefault("_split_cache", {})
        key = id(weight)
        hit = cache.get(key)
        if hit is None or hit[0] != (weight.data_ptr(), weight._version):
            hi = weight.float().to(torch.bfloat16)
            lo = (weight.float() - hi.float()).to(torch.bfloat16)
            hit = cache[key] = ((weight.data_ptr(), weight._version), torch.cat([hi, lo]))
        return hit[1]

    def _commit_with_kernels(self, kv: torch.Tensor, score: torch.Tensor, start: int, ring: CompressorRing,
                             freqs: torch.Tensor) -> torch.Tensor:
        """The same through the fused compressor and ring-write kernels: this request as a batch of one,
        its ring as slot 0, the new entries as pages of one row (page_table maps entry e to row e − first)."""
        n, ratio, device = kv.shape[0], self.ratio, kv.device
        first, end = (start + ratio) // ratio - 1, (start + n) // ratio  # entries first … end−1 commit now
        plan = build_compress_plan([start], [n], ratio, self.overlap, device=device)
        cos, sin = rope_cos_sin(torch.arange(max(start + n, 1), device=device), freqs)
        page_table = (torch.arange(max(end, 1), device=device, dtype=torch.int32) - first)[None]
        kv_state, score_state = ring.kv[None], ring.score[None]  # [1, state_size, coff*d] views
        slot = torch.zeros(1, dtype=torch.int64, device=device)
        m = max(end - first, 0)
        args = (kv.contiguous(), score.contiguous(), self.ape, kv_state, score_state, slot, plan, self.norm.weight,
                cos, sin)
        if self.output == "main":
            out = torch.empty(m, 1, self.head_dim, dtype=self.act_dtype, device=device)
            compress_main(*args, out, page_table, eps=self.norm.eps, act_dtype=self.act_dtype,
                          fp8_nope=self.quantize == "fp8")
        elif self.quantize == "fp8":
            out = torch.zeros(m, 1, INDEX_ROW_BYTES, dtype=torch.uint8, device=device)
            compress_indexer(*args, out, page_table, eps=self.norm.eps, act_dtype=self.act_dtype)
        else:
            raise ValueError(f"the indexer's {self.quantize!r} simulation has no GPU kernel; use indexer_quant='fp8'")
        compressor_state_write(*args[:7])
        return out[:, 0]

    def _pool(self, kv: torch.Tensor, score: torch.Tensor, block_start: torch.Tensor) -> torch.Tensor:
        """Softmax-gated pooling; block_start `[m]` = row of each entry's first own position."""
        ratio, d = self.ratio, self.head_dim
        own = block_start[:, None] + torch.arange(ratio, device=kv.device)  # [m, ratio]
        if self.overlap:
            prev = own - ratio
            win_kv = torch.cat([kv[prev][..., :d], kv[own][..., d:]], dim=1)  # [m, 2*ratio, d]
            win_score = torch.cat([score[prev][..., :d], score[own][..., d:]], dim=1)
        else:
            win_kv, win_score = kv[own], score[own]  # [m, ratio, d]
        return (win_kv * softmax(win_score, dim=1)).sum(dim=1)  # [m, d] fp32

    def _finish(self, pooled: torch.Tensor, rope_pos: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        y = self.norm(pooled.to(self.act_dtype))
        cos, sin = rope_cos_sin(rope_pos, freqs)
        y = apply_rope(y, cos, sin)
        if self.output == "main":
            if self.quantize == "fp8":
                y = torch.cat([fp8_round_trip(y[:, : -self.rope_dim], 64), y[:, -self.rope_dim:]], dim=-1)
            return y
        y = hadamard_rotate(y.float())
        if self.quantize == "fp8":
            return index_cache_rows(y)
        return quantize_index_rows(y, self.quantize)


def index_cache_rows(keys: torch.Tensor) -> torch.Tensor:
    """Indexer keys `[m, 128]` as FP8 cache rows `[m, 144]` uint8 (kernels/indexer.py's format)."""
    rows = torch.zeros(1, keys.shape[0], INDEX_ROW_BYTES, dtype=torch.uint8, device=keys.device)
    slots = torch.arange(keys.shape[0], dtype=torch.int64, device=keys.device)
    indexer_cache_write(rows, keys, slots, "ue8m0")
    return rows[0]


def quantize_index_rows(x: torch.Tensor, mode: str) -> torch.Tensor:
    """The indexer's quantization round trip on rows of 128 values (queries per head, and keys), fp32 out.

    fp8: one power-of-two scale per row (the serving FP8 cache format); fp4: e2m1 in blocks of 32 (the
    published reference's simulation); none: unchanged.
    """
    if mode == "fp8":
        return dequantize_rows_fp8(*quantize_rows_fp8(x.float(), "ue8m0"))
    if mode == "fp4":
        return fp4_round_trip(x.float(), 32)
    return x.float()
