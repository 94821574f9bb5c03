#!/usr/bin/env python3
"""The service path's own cost per output token: a `sparsepd serve` (colocated `tiny` on the CPU by default) under
many concurrent streams, with each process's CPU time per output token beside the throughput.

    .venv/bin/python bench/bench_service.py                                   # tiny, colocated, CPU: 64 and 128 streams
    .venv/bin/python bench/bench_service.py --concurrency 128 --profile out/  # + py-spy of the router and worker
    python3 bench/bench_service.py --serve-args "--preset bench --colocated --devices cuda:0 --num-slots 128" \
        --concurrency 128 --input-len 128 --output-len 512 --rounds 1         # the GPU figure

Each point: `--concurrency` streams, each sending `--rounds` requests one after another (random prompt ids of
`--input-len`, exactly `--output-len` tokens: ignore_eos, min = max tokens, greedy) through the public gRPC API
after one warm-up request per stream (neither its tokens nor the CPU time it took count). Per point: output
tokens/s over first send → last end, TPOT p50 (the load test's definition), and the CPU time (user + system,
/proc) the router, the worker(s) and this client took during the point, in µs per output token: the router's
column is the service path's host cost outside the engine (the token stream from the worker, stop rules, the
public stream's messages); the worker's is its engine step and its token messages together (on a GPU, also any
time its loop thread spins in a device sync), split by thread on stderr (bench/host_worker.py names its threads;
a launched worker's show as `python`).

`--standin STEP_MS` measures the router alone: a `sparsepd router` (`--router-args`, e.g. `--stream-interval 4`)
in front of bench/standin_worker.py, which sends a token for every running request each STEP_MS with no engine:
a token rate no CPU engine reaches, so the router's column is its own cost per token when it is busy.
`--host-worker` measures the real worker without its model: bench/host_worker.py (`sparsepd decode-worker
--colocated` with bench/bench_host.py's stand-in forward; `--worker-args`, e.g. `--device-ms 4` for a device-like
step) behind a `sparsepd router` (`--router-args`). Its worker column is the decode worker's own host cost per
output token (scheduler, metadata, step loop, token messages, control calls), comparable with bench_host's µs per
request-step:

    .venv/bin/python bench/bench_service.py --host-worker --concurrency 128 --input-len 128 --output-len 256

`--profile DIR` samples the router and the worker with py-spy during each point (if installed) and prints each
one's top frames by own time; the raw stacks stay in DIR.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import random
import shlex
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np

from sparsepd.deploy.launch import start, stop
from sparsepd.loadtest.client import open_channel, send
from sparsepd.loadtest.metrics import OK, RequestRecord
from sparsepd.proto import sglang_scheduler_pb2 as pb
from sparsepd.proto import sglang_scheduler_pb2_grpc as pb_grpc

TICKS_S = os.sysconf("SC_CLK_TCK")
ROLES = ("router", "decode-worker", "prefill-worker", "smg")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--serve-args", default="--preset tiny --colocated", help="options of the launched serve")
    p.add_argument("--concurrency", default="64,128", help="comma-separated stream counts (default: 64,128)")
    p.add_argument("--input-len", type=int, default=16)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2, help="requests per stream in a point (default: 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--standin", type=float, default=None, metavar="STEP_MS",
                   help="the router alone, before a stand-in worker stepping every STEP_MS (no serve, no engine)")
    p.add_argument("--router-args", default="",
                   help="with --standin or --host-worker: options of the router, e.g. --stream-interval 4")
    p.add_argument("--host-worker", action="store_true",
                   help="the real colocated worker with a stand-in forward (bench/host_worker.py) behind a router")
    p.add_argument("--worker-args", default="--num-slots 256 --num-pages 4096 --max-batch-tokens 4096",
                   help="with --host-worker: its decode-worker options (default: %(default)s)")
    p.add_argument("--profile", default=None, metavar="DIR", help="py-spy the router and worker into DIR")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds a request may take")
    return p.parse_args(argv)


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                kids = [int(x) for x in (task / "children").read_text().split()]
            except OSError:
                continue
            out += kids
            todo += kids
    return out


def role_pids(serve_pid: int) -> dict[str, list[int]]:
    """The serve's children by role (its command line's subcommand; smg by name)."""
    found: dict[str, list[int]] = {}
    for pid in descendants(serve_pid):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        words = [a.decode(errors="replace") for a in argv]
        role = next((r for r in ROLES if r in words or any(w.endswith(r) for w in words[:1])), None)
        if role is not None:
            found.setdefault(role, []).append(pid)
    return found


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (its threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS_S


def thread_cpu_s(pid: int) -> Counter:
    """User + system CPU seconds of a process's threads, summed by thread name (/proc/PID/task/*/comm)."""
    out: Counter = Counter()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            name = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[name.rstrip("0123456789_") or name] += (int(fields[11]) + int(fields[12])) / TICKS_S
    return out


def start_counters(into: dict, pids: list[int]) -> None:
    """The CPU counters at a point's start: each process's, the first worker's by thread, this client's."""
    gone = [pid for pid in pids if not Path(f"/proc/{pid}").exists()]
    if gone:
        raise SystemExit(f"bench_service: process(es) {gone} of the service exited during the warm-up requests "
                         f"(the serve's own log says why); no point measured")
    into.update({pid: cpu_s(pid) for pid in pids}, threads=thread_cpu_s(pids[1]), client=time.process_time())


def request(i: int, rng: random.Random, input_len: int, output_len: int) -> pb.GenerateRequest:
    ids = [rng.randrange(32, 127) for _ in range(input_len)]  # printable bytes: no special ids in any vocabulary
    sampling = pb.SamplingParams(temperature=0.0, max_new_tokens=output_len, min_new_tokens=output_len,
                                 ignore_eos=True, top_p=1.0, top_k=-1)
    return pb.GenerateRequest(request_id=f"bench-service-{i}", tokenized=pb.TokenizedInput(input_ids=ids),
                              sampling_params=sampling, stream=True)


async def run_point(address: str, concurrency: int, rounds: int, args, rng: random.Random,
                    warm: Callable[[], None] = lambda: None) -> tuple[list, float]:
    """One warm-up request per stream, then `warm()` (the CPU counters' start), then the point's requests."""
    async with open_channel(address) as channel:
        stub = pb_grpc.SglangSchedulerStub(channel)
        warmup: list[RequestRecord] = []
        await asyncio.gather(*(send(stub, request(-1 - i, rng, args.input_len, args.output_len), args.timeout,
                                    warmup) for i in range(concurrency)))
        failed = Counter(f"{r.status}: {r.error[:120]}" for r in warmup if r.status != OK)
        if failed:
            print(f"# {sum(failed.values())} of {len(warmup)} warm-up requests failed: {dict(failed)}",
                  file=sys.stderr, flush=True)
        warm()
        records: list[RequestRecord] = []
        counter = iter(range(concurrency * rounds))

        async def stream() -> None:
            for _ in range(rounds):
                await send(stub, request(next(counter), rng, args.input_len, args.output_len), args.timeout, records)

        started = time.perf_counter()
        await asyncio.gather(*(stream() for _ in range(concurrency)))
        return records, time.perf_counter() - started


def py_spy(pid: int, out: Path) -> subprocess.Popen | None:
    exe = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if exe is None:
        return None
    return subprocess.Popen([exe, "record", "--pid", str(pid), "--format", "raw", "--rate", "200", "--nonblocking",
                             "--output", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def top_functions(stacks: Path, n: int = 12) -> list[tuple[str, float]]:
    """py-spy raw (collapsed) stacks → the frames with the most own samples, as shares of all samples."""
    own: Counter = Counter()
    total = 0
    for line in stacks.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        own[stack.split(";")[-1]] += int(count)
        total += int(count)
    return [(frame, c / max(total, 1)) for frame, c in own.most_common(n)]


def start_standin(script: str, args: list[str]) -> tuple[subprocess.Popen, str]:
    """A worker script of bench/ (standin_worker.py, host_worker.py), once it prints its control address."""
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name(script)), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    for line in proc.stdout:
        if line.startswith("READY "):
            ready = json.loads(line[len("READY "):])
            return proc, ready.get("address") or ready["grpc"]
    proc.kill()
    raise SystemExit(f"error: {script} did not start (exit {proc.wait()})")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    standin = None
    if args.standin is not None or args.host_worker:
        if args.host_worker:
            standin, address = start_standin("host_worker.py", ["--colocated", "--no-cluster-auth", "--log-level",
                                                                "WARNING", *shlex.split(args.worker_args)])
            args.serve_args = f"(router {args.router_args}; host_worker.py {args.worker_args}: stand-in forward)"
        else:
            standin, address = start_standin("standin_worker.py", ["--step-ms", str(args.standin)])
            args.serve_args = f"(router {args.router_args} alone; stand-in worker stepping every {args.standin} ms)"
        launch = ["router", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1", "--colocated", address,
                  "--preset", "tiny", "--no-cluster-auth", *shlex.split(args.router_args)]
    else:
        launch = ["serve", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1", *shlex.split(args.serve_args)]
    print(f"# launching: sparsepd {shlex.join(launch)}", file=sys.stderr, flush=True)
    try:
        child = start(launch[0], launch, timeout_s=900.0)
    except BaseException:
        if standin is not None:
            standin.terminate()
        raise
    rng = random.Random(args.seed)
    rows = []
    try:
        if standin is not None:
            pids = {"router": [child.pid], "decode-worker": [standin.pid]}
        else:
            pids = role_pids(child.pid)
        workers = pids.get("decode-worker", []) + pids.get("prefill-worker", [])
        print(f"# pids: {pids}", file=sys.stderr, flush=True)
        for conc in [int(c) for c in args.concurrency.split(",") if c.strip()]:
            spies = []
            if args.profile:
                Path(args.profile).mkdir(parents=True, exist_ok=True)
                for role, pid in (("router", pids["router"][0]), ("worker", workers[0])):
                    spy = py_spy(pid, Path(args.profile) / f"{role}_c{conc}.txt")
                    if spy is not None:
                        spies.append((role, spy))
            before: dict = {}
            # the counters start after the warm-up requests: only the point's tokens count
            warm = functools.partial(start_counters, before, [pids["router"][0], *workers])
            records, _ = asyncio.run(run_point(child.ready["grpc"], conc, args.rounds, args, rng, warm))
            client_s = time.process_time() - before.pop("client")
            threads = thread_cpu_s(workers[0])
            threads.subtract(before.pop("threads"))
            used = {pid: cpu_s(pid) - t for pid, t in before.items()}
            for _, spy in spies:
                spy.send_signal(2)  # SIGINT: py-spy writes its file
                spy.wait(timeout=60)
            ok = [r for r in records if r.status == OK]
            tokens = sum(r.output_tokens for r in ok)
            span = max(r.end_s for r in ok) - min(r.start_s for r in ok)
            tpot = [t for r in ok if (t := r.tpot_s) is not None]
            per_token = 1e6 / max(tokens, 1)
            rows.append({"conc": conc, "ok": len(ok), "failed": len(records) - len(ok), "tokens": tokens,
                         "tok_s": tokens / span, "tpot_p50_ms": float(np.percentile(tpot, 50)) * 1e3 if tpot else 0,
                         "router_us": used[pids["router"][0]] * per_token,
                         "worker_us": sum(used[p] for p in workers) * per_token, "client_us": client_s * per_token})
            print(f"# worker {workers[0]} at c={conc}, CPU µs per output token by thread: " + ", ".join(
                f"{name} {s * per_token:.1f}" for name, s in threads.most_common() if s * per_token >= 0.05),
                file=sys.stderr)
            for role, _ in spies:
                path = Path(args.profile) / f"{role}_c{conc}.txt"
                if path.exists():
                    print(f"# {role} at c={conc}, own time by frame (py-spy, {path}):", file=sys.stderr)
                    for frame, share in top_functions(path):
                        print(f"#   {share:6.1%}  {frame}", file=sys.stderr)
    finally:
        stop(child, timeout_s=60.0)
        if standin is not None:
            standin.terminate()
            standin.wait(timeout=30)
    print(f"# sparsepd serve {args.serve_args}; {args.input_len} in / {args.output_len} out, greedy, "
          f"{args.rounds} requests per stream; CPU µs per output token by process")
    print(f"{'streams':>7} {'ok':>5} {'fail':>4} {'tokens':>7} {'out tok/s':>10} {'TPOT p50':>9} "
          f"{'router µs':>10} {'worker µs':>10} {'client µs':>10}")
    for r in rows:
        print(f"{r['conc']:>7} {r['ok']:>5} {r['failed']:>4} {r['tokens']:>7} {r['tok_s']:>10.1f} "
              f"{r['tpot_p50_ms']:>9.1f} {r['router_us']:>10.1f} {r['worker_us']:>10.1f} {r['client_us']:>10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
