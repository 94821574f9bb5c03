"""AMD build check report: every Triton kernel × launch config × target, compiled on the CPU (no AMD hardware).

Compiles what tests/kernels/test_amd_compile.py compiles (every launch the wrappers make at the project's shapes,
for gfx950 / MI355X and gfx942 / MI300X; all of them, or with --quick the largest tiles of each code path) and
prints markdown: a summary per kernel and target, then one row per kernel, config and target. Launches that differ
only in how Triton specialises runtime arguments (ints equal to 1, 16-byte divisibility, 32-bit pointer ranges)
share a row that shows the largest figures of its variants.

Columns: VGPRs = `.vgpr_count` (architectural VGPRs plus AGPRs: one unified file of 512 a lane on gfx90a/gfx942/
gfx950), AGPRs, SGPRs, spills = VGPRs / SGPRs spilled, scratch = `.private_segment_fixed_size` (bytes a lane),
LDS = Triton's `shared` bytes (allocated at launch) plus static LDS, waves/SIMD = the register-limited occupancy
LLVM prints in the AMDGCN ("; Occupancy: N"; without it 512 / VGPRs rounded up to the granule of 8, at most 8),
LDS waves = the LDS-limited one (workgroups whose LDS fits the CU's, times warps a workgroup, over 4 SIMDs).

    python3 bench/amd_compile_report.py [--quick] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "kernels"))

import test_amd_compile as amd  # noqa: E402

FIGURES = ("vgpr_count", "agpr_count", "sgpr_count", "vgpr_spill_count", "sgpr_spill_count",
           "private_segment_fixed_size", "shared", "group_segment_fixed_size")


def lds(row: dict) -> int:
    return row["shared"] + (row["group_segment_fixed_size"] or 0)


def lds_waves(row: dict) -> int:
    """Waves a SIMD can hold as far as LDS goes (8 at most, also without LDS)."""
    if lds(row) == 0:
        return 8
    return min(8, row["lds_limit"] // lds(row) * row["num_warps"] // 4)


def used_by(where: list[str]) -> str:
    """"bench decode", "v4-pro prefill", ... as "decode: bench, v4-pro · prefill: v4-pro"."""
    phases: dict[str, list[str]] = defaultdict(list)
    for item in where:
        preset, phase = item.rsplit(" ", 1)
        phases[phase].append(preset)
    return " · ".join(f"{phase}: {', '.join(sorted(presets))}" for phase, presets in sorted(phases.items()))


def merge_variants(rows: list[dict]) -> list[dict]:
    """One row per (kernel, config, target): the largest figures over its specialisation variants."""
    merged: dict[tuple, dict] = {}
    for row in rows:
        key = (row["module"], row["kernel"], row["arch"], row["config"])
        if key not in merged:
            merged[key] = dict(row, variants=1, where=set(row["where"]))
            continue
        m = merged[key]
        for name in FIGURES:
            m[name] = max(m[name] or 0, row[name] or 0)
        m["occupancy"] = min(m["occupancy"], row["occupancy"])
        m["variants"] += 1
        m["where"] |= set(row["where"])
    return [merged[key] for key in sorted(merged)]


def status(row: dict) -> str:
    found = amd.problems(row)
    if found:
        return "**" + "; ".join(found) + "**"
    return "ok (SGPR spills allowed)" if row["sgpr_spill_count"] else "ok"


def summary_table(rows: list[dict]) -> list[str]:
    out = ["| kernel | target | configs | max VGPRs | max AGPRs | max spills V/S | max scratch B | max LDS B | "
           "min waves/SIMD | min LDS waves | fits |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["module"], row["kernel"], row["arch"])].append(row)
    for (module, kernel, arch), rs in sorted(groups.items()):
        fits = all(status(r).startswith("ok") for r in rs)
        allowed = any(r["sgpr_spill_count"] for r in rs) and fits
        out.append(f"| {module}.{kernel} | {arch} | {len(rs)} | {max(r['vgpr_count'] for r in rs)} | "
                   f"{max(r['agpr_count'] or 0 for r in rs)} | {max(r['vgpr_spill_count'] for r in rs)} / "
                   f"{max(r['sgpr_spill_count'] for r in rs)} | {max(r['private_segment_fixed_size'] for r in rs)} | "
                   f"{max(lds(r) for r in rs)} | {min(r['occupancy'] for r in rs)} | "
                   f"{min(lds_waves(r) for r in rs)} | "
                   f"{'yes (SGPR spills allowed)' if allowed else 'yes' if fits else '**no**'} |")
    return out


def full_table(rows: list[dict]) -> list[str]:
    out = ["| kernel | config | target | VGPRs | AGPRs | SGPRs | spills V/S | scratch B | LDS B | waves/SIMD | "
           "LDS waves | variants | used by | check |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        out.append(f"| {r['module']}.{r['kernel']} | {r['config']} | {r['arch']} | {r['vgpr_count']} | "
                   f"{r['agpr_count'] or 0} | {r['sgpr_count']} | {r['vgpr_spill_count']} / {r['sgpr_spill_count']} | "
                   f"{r['private_segment_fixed_size']} | {lds(r)} | {r['occupancy']} | {lds_waves(r)} | "
                   f"{r['variants']} | {used_by(sorted(r['where']))} | {status(r)} |")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the largest tiles of each code path only")
    parser.add_argument("--out", type=Path, help="also write the markdown here")
    args = parser.parse_args(argv)
    if not amd.has_hip_backend():
        print("the installed Triton has no HIP (AMD) backend", file=sys.stderr)
        return 1
    import triton
    start = time.perf_counter()
    raw = amd.run_build_check(exhaustive=not args.quick)
    wall_s = time.perf_counter() - start
    rows = merge_variants(raw)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    targets = ", ".join(f"{t.arch} ({t.gpu}, {t.num_cus} CUs, {t.lds_bytes // 1024} KiB LDS)" for t in amd.TARGETS)
    lines = [f"Triton {triton.__version__}, commit {commit}; targets {targets}; {len(raw)} compiled launches "
             f"({len(rows)} kernel × config × target rows), {wall_s:.0f} s wall on "
             f"{len(os.sched_getaffinity(0))} cores.", "", *summary_table(rows), "", *full_table(rows)]
    for kernel, why in amd.SGPR_SPILLS_ALLOWED.items():
        lines += ["", f"SGPR spills allowed in {kernel} (kept in VGPR lanes, no scratch): {why}."]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
