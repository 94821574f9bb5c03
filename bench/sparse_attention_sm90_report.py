"""Sparse attention's sm_90 compile report on the CPU (no GPU): registers, spills, shared memory, grid, plain loads.

For each target shape of issue 31 (D = 512, K = 1152) it compiles `_sparse_attn_fwd` for sm_90 as
tests/kernels/test_sparse_attention_smem.py does (Triton's NVIDIA backend, its ptxas with Triton's flags) at the
launch `default_config` picks for bf16 rows and for FP8 KV rows, for FP8 rows also at the bf16 rows' tiles (the
FP8 table before 2026-12-06) and with the other dequantizations (`SparseAttnConfig.dequant`: cvt, cvt_chunks), and
split launches also with `fused_merge`, and prints one markdown row each:
registers a thread, spill store bytes, shared bytes, the tile, programs (against 132 SMs), and the plain
(non-cp.async) row loads left in the key loop.

    python3 bench/sparse_attention_sm90_report.py [--out FILE.md]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "kernels"))
os.environ["TRITON_INTERPRET"] = "0"

import test_sparse_attention_smem as smem  # noqa: E402
import triton  # noqa: E402

from sparsepd.kernels.kv_rows import KVRowLayout  # noqa: E402
from sparsepd.kernels.sparse_attention import SM90_SMEM_BYTES, default_config, fit_shared_memory  # noqa: E402

SHAPES = [(1, 64), (1, 128), (32, 64), (128, 64), (64, 128), (128, 128), (8192, 64)]
K, D, SMS = 1152, 512, 132


def programs(T: int, H: int, config) -> int:
    """The wrapper's grid size (sparse_attn: splits rounded to whole key steps)."""
    per_split = triton.cdiv(triton.cdiv(K, config.num_splits), config.block_n) * config.block_n
    return T * triton.cdiv(H, config.block_h) * triton.cdiv(K, per_split)


def rows() -> list[str]:
    import torch
    layout = KVRowLayout(D, 64, torch.bfloat16)
    out = []
    for T, H in SHAPES:
        bf16 = default_config(T, H, K, D, SMS)
        fp8 = default_config(T, H, K, D, SMS, fp8_rows=True)
        cases = [("bf16", False, bf16), ("FP8", True, fp8),
                 ("FP8 at bf16 tiles", True, fit_shared_memory(bf16, D, 2, layout, SM90_SMEM_BYTES))]
        cases += [(f"FP8 {mode}", True, dataclasses.replace(fp8, dequant=mode)) for mode in ("cvt", "cvt_chunks")]
        if fp8.num_splits > 1:  # the split merge in the last program (one launch)
            cases += [("bf16 fused merge", False, dataclasses.replace(bf16, fused_merge=True)),
                      ("FP8 fused merge", True, dataclasses.replace(fp8, fused_merge=True))]
        for name, fp8, c in cases:
            fields = tuple(getattr(c, f) for f in c.__dataclass_fields__)
            shared, regs, spills, loads = smem.compile_shared(T, H, K, fp8, fields)
            plain = ", ".join(sorted(set(loads) - {"i32"})) or "—"
            cfg = f"h{c.block_h}/n{c.block_n}/s{c.num_splits}/w{c.num_warps}/st{c.num_stages}"
            out.append(f"| {T} | {H} | {name} | {cfg} | {regs} | {spills} | {shared:,} | {programs(T, H, c)} "
                       f"| {plain} |")
            print(out[-1], flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="also write the table here")
    args = parser.parse_args()
    header = ["| T | H | rows | tile | regs | spill B | shared B | programs | plain loads in the loop |",
              "|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(header))
    table = header + rows()
    if args.out:
        Path(args.out).write_text("\n".join(table) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
