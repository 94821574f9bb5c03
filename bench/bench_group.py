"""Worker-group benchmark (engine/group.py, model/expert_parallel.py): decode steps of a group of N ranks, one
process per device, and how much of a step the experts' all-to-all takes; with N = 1, the plain engine beside the
group of one on the same GPU (the group's code path costs nothing measurable); with --check, the group's logits
and greedy tokens against the whole model on one device.

    python3 -P bench/bench_group.py --devices cuda:0 --ep 1 --compare-plain [--exchange auto,reference]
        [--batches 1,64,256] [--out DIR]
    python3 -P bench/bench_group.py --devices cuda:0,cuda:1 --ep 2 --check [--batches 1,64,256] [--out DIR]
        [--context 4096] [--steps 20] [--preset bench] [--load-format auto|dummy] [--dtype ...] [--num-layers N]

A batch is the group's: B requests dealt round-robin over the ranks (at batch 1 the other ranks run empty steps).
Per batch: the step's wall time (every rank steps in lockstep, synchronized at the end), decode tokens/s of the
group, the all-to-all share (the GPU time of the NCCL kernels over the step's, from the profiler, rank 0) and rank
0's weight floor (the weight bytes its step reads over the measured copy bandwidth: `floor_ms`), and the device
operations a step (kernels, copies and fills the profiler saw, rank 0). `--exchange`: the
backends of the experts' row exchange to time, one row each (kernels/ep_rows.py: "auto" is its Triton kernels on a
GPU, "reference" its torch ops; "triton" on the CPU runs the kernels in the interpreter, TRITON_INTERPRET=1). Rank
0 prints a markdown table and writes group_bench.json under --out. The same script runs on the CPU over gloo
(`--devices cpu --ep 1`, small --context) to check it; the timings there mean nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from sparsepd.engine.config import EngineConfig
from sparsepd.engine.engine import Engine
from sparsepd.engine.group import RankGroup
from sparsepd.engine.pools import PoolConfig
from sparsepd.engine.sampling import SamplingParams
from sparsepd.group_args import GroupSpec
from sparsepd.load_options import add_load_args, load_options_from_args


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (length,), generator=gen).tolist() for _ in range(n)]


def mine(items: list, group: RankGroup) -> list:
    """This rank's share of the group's items (round-robin)."""
    return items[group.rank::group.spec.ep]


def decode_point(group: RankGroup | None, model, device: str, batch: int, context: int, steps: int,
                 cuda_graph: bool) -> dict:
    """One batch size: prefill the group's requests (this rank's share), then time `steps` decode steps."""
    cfg = model.cfg
    share = mine(prompts(batch, context, cfg.vocab_size, seed=batch), group) if group is not None else \
        prompts(batch, context, cfg.vocab_size, seed=batch)
    new = min(1024, cfg.max_seq_len - context)  # none finishes during the run
    pages = max(1, len(share)) * (-(-(context + new + 16) // cfg.page_size))
    engine = Engine(model, PoolConfig(num_slots=max(1, len(share)), max_batch_tokens=8192, num_pages=pages),
                    cuda_graph=cuda_graph, overlap=True)
    params = SamplingParams(max_new_tokens=new, ignore_eos=True)
    reqs = [engine.submit(p, params) for p in share]
    step = (lambda: group.step(engine)) if group is not None else engine.step
    while (group.any(any(r.prefilling or not r.output_ids for r in reqs)) if group is not None
           else any(r.prefilling or not r.output_ids for r in reqs)):
        step()
    for _ in range(3):
        step()
    runs = []
    for _ in range(3):
        sync(device)
        t = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        runs.append((time.perf_counter() - t) / steps)
    step_ms = statistics.median(runs) * 1e3
    share_a2a, device_ops = device_profile(step, device)
    for r in reqs:
        engine.abort(r.request_id)
    while group is not None and group.any(engine.scheduler.has_work):
        step()
    return dict(batch=batch, rank_batch=len(share), step_ms=step_ms, tok_s=batch / step_ms * 1e3,
                all_to_all_share=share_a2a, device_ops=device_ops,
                floor_ms=floor_ms(model, batch, copy_bandwidth(device)))


def copy_bandwidth(device: str) -> float | None:
    """Bytes/s of a 1 GiB device-to-device copy (read + write counted), median of 20 (None on the CPU)."""
    if not device.startswith("cuda"):
        return None
    src = torch.randn(2**28, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(22):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    del src, dst
    return 2 * 2**28 * 4 / statistics.median(times[2:])


def floor_ms(model, batch: int, bandwidth: float | None) -> float | None:
    """This rank's weight bytes a decode step of the group's `batch` tokens reads, over the copy bandwidth: every
    replicated weight, and each held expert with the chance that one of the batch's tokens picks it
    (1 − (1 − k/E)^batch); the KV state is not counted."""
    if bandwidth is None:
        return None
    cfg = model.cfg
    touched = 1 - (1 - cfg.n_activated_experts / cfg.n_routed_experts) ** batch
    total = 0.0
    for name, t in model.state_dict().items():
        if name.endswith("tid2eid"):
            continue
        total += t.nbytes * (touched if ".ffn.experts." in name else 1.0)
    return total / bandwidth * 1e3


def device_profile(step, device: str, steps: int = 5) -> tuple[float | None, float | None]:
    """Over `steps` steps, from the profiler: the GPU time of the NCCL kernels over all GPU kernel time, and the
    device operations (kernels, copies, fills) a step (None, None on the CPU)."""
    if not device.startswith("cuda"):
        return None, None
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        sync(device)
    total = nccl = 0.0
    for e in prof.key_averages():
        t = e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
        total += t
        if "nccl" in e.key.lower():
            nccl += t
    ops = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    return (nccl / total if total else None), ops / steps


def check(group: RankGroup, model, cfg: EngineConfig, context: int) -> dict:
    """The group's logits and greedy tokens on this rank's prompt against the whole model (every expert) on the
    same device: max |Δ logit| relative to the largest, argmax agreement, and the greedy tokens of both."""
    reference = cfg.build_model()
    prompt = mine(prompts(group.spec.ep, min(context, 512), model.cfg.vocab_size, seed=7), group)[0]
    logits = model.forward(torch.tensor(prompt, device=cfg.device), model.new_state())
    ref = reference.forward(torch.tensor(prompt, device=cfg.device), reference.new_state())
    worst = (logits - ref).abs().max().item() / max(1.0, ref.abs().max().item())
    agree = (logits.argmax(-1) == ref.argmax(-1)).float().mean().item()
    params = SamplingParams(max_new_tokens=32, ignore_eos=True)
    engine = Engine(model, PoolConfig(num_slots=2, max_batch_tokens=2048, num_pages=64), cuda_graph=False)
    req = engine.submit(prompt, params)
    while group.any(engine.scheduler.has_work):
        group.step(engine)
    expected = Engine(reference, PoolConfig(num_slots=2, max_batch_tokens=2048, num_pages=64),
                      cuda_graph=False).generate([prompt], params)[0]
    del reference
    return dict(rank=group.rank, max_rel_logit_diff=worst, argmax_agreement=agree, tokens=req.output_ids,
                reference_tokens=expected.output_ids, tokens_equal=req.output_ids == expected.output_ids)


def run_rank(args: argparse.Namespace) -> None:
    spec = GroupSpec(devices=tuple(args.devices.split(",")), ep=args.ep, master_port=args.master_port,
                     local_rank=args.local_rank, timeout_s=600)
    started = time.monotonic()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    group = RankGroup(spec)
    cfg = EngineConfig(preset=args.preset, device=spec.device, load=load_options_from_args(args))
    cfg = group.engine_config(cfg)
    model = group.build_model(cfg)
    rows = []
    plain = cfg.build_model() if args.compare_plain and spec.ep == 1 else None
    for b in (int(x) for x in args.batches.split(",")):
        if plain is not None:
            rows.append({"mode": "plain", **decode_point(None, plain, spec.device, b, args.context, args.steps,
                                                           cfg.cuda_graph)})
        for exchange in args.exchange.split(","):
            group.ep.backend = exchange
            mode = f"group of {spec.ep}" + ("" if exchange == "auto" else f", {exchange} exchange")
            rows.append({"mode": mode, **decode_point(group, model, spec.device, b, args.context, args.steps,
                                                      cfg.cuda_graph)})
        group.ep.backend = "auto"
    result = dict(device=torch.cuda.get_device_name() if spec.backend == "nccl" else "cpu", preset=args.preset,
                  ep=spec.ep, context=args.context, cuda_graph=cfg.cuda_graph and spec.backend == "nccl", rows=rows)
    if args.check:
        result["check"] = check(group, model, cfg, args.context)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"group_bench_rank{group.rank}.json").write_text(json.dumps(result, indent=1))
    if group.rank == 0:
        print_table(result)
    print(f"rank {group.rank}: done in {time.monotonic() - started:.1f} s; leaving the group", file=sys.stderr,
          flush=True)
    group.exit(0)


def print_table(result: dict) -> None:
    print(f"# {result['preset']} on {result['device']}, group of {result['ep']}, {result['context']}-token contexts, "
          f"CUDA graphs {'on' if result['cuda_graph'] else 'off'}\n")
    print("| mode | batch (rank 0's) | step ms | decode tokens/s | all-to-all share | device ops / step "
          "| weight floor ms (rank 0) |")
    print("|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        share = "—" if r["all_to_all_share"] is None else f"{r['all_to_all_share']:.0%}"
        floor = "—" if r["floor_ms"] is None else f"{r['floor_ms']:.2f}"
        ops = "—" if r["device_ops"] is None else f"{r['device_ops']:.0f}"
        print(f"| {r['mode']} | {r['batch']} ({r['rank_batch']}) | {r['step_ms']:.2f} | {r['tok_s']:.0f} | {share} "
              f"| {ops} | {floor} |")
    if "check" in result:
        c = result["check"]
        print(f"\ncheck (rank 0): max |Δ logit| / max |logit| {c['max_rel_logit_diff']:.2e}, argmax agreement "
              f"{c['argmax_agreement']:.1%}, greedy tokens equal: {c['tokens_equal']}")
    sys.stdout.flush()


def launch(args: argparse.Namespace) -> int:
    """Start one process per device of --devices (this script with --local-rank) and wait for them."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    devices = args.devices.split(",")
    if len(devices) != args.ep:
        raise SystemExit(f"--ep {args.ep} must equal the {len(devices)} devices of --devices (one host)")
    procs = [subprocess.Popen([sys.executable, "-P", __file__, *sys.argv[1:], "--local-rank", str(i),
                               "--master-port", str(port)]) for i in range(len(devices))]
    codes = [p.wait() for p in procs]
    print(f"ranks exited with {codes}", file=sys.stderr, flush=True)
    if any(codes):
        print(f"error: rank exit codes {codes}", file=sys.stderr)
        return 1
    if args.check:
        checks = [json.loads((Path(args.out) / f"group_bench_rank{r}.json").read_text())["check"]
                  for r in range(args.ep)]
        print("\n| rank | max |Δ logit| / max |logit| | argmax agreement | greedy tokens equal |\n|---|---|---|---|")
        for c in checks:
            print(f"| {c['rank']} | {c['max_rel_logit_diff']:.2e} | {c['argmax_agreement']:.1%} | "
                  f"{c['tokens_equal']} |")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", default="cuda:0")
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--batches", default="1,64,256")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--preset", default="bench")
    ap.add_argument("--compare-plain", action="store_true", help="with --ep 1: the plain engine beside the group")
    ap.add_argument("--exchange", default="auto", help="the row exchange's backends to time, comma-separated: auto "
                    "(Triton on a GPU), reference (torch ops), triton")
    ap.add_argument("--check", action="store_true", help="logits and greedy tokens against the whole model")
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="where the JSON goes (default: $OUT or .)")
    ap.add_argument("--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--master-port", type=int, default=0, help=argparse.SUPPRESS)
    add_load_args(ap)
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.local_rank is None:
        return launch(args)
    run_rank(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
