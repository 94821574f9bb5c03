#!/usr/bin/env python3
"""Memory under churn: `sparsepd serve` (tiny, CPU, 1 prefill + 1 decode worker) under a steady stream of
short requests (a quarter with a stop string, n = 2, log-probabilities, penalties or one of 1,000 regexes), a
share of them aborted at random moments (half by client cancel, half by the Abort RPC),
while the resident memory (VmRSS) of the router, the prefill worker, the decode worker and serve itself is
sampled every few seconds and at every tenth of the requests. Tells warm-up from a leak: the summary gives
each process's RSS at 10 %, 50 % and 100 % of the requests and the slope of a straight line fitted to the
second half of the samples (MB per 1,000 requests), which a leak keeps above zero.

    .venv/bin/python bench/soak_rss.py --requests 20000 --out /tmp/soak      # about 1 h on 2 busy cores
    .venv/bin/python bench/soak_rss.py --requests 2000 --concurrency 16      # a quick look

Writes OUT/soak_rss.csv (one row per sample: seconds, requests done, MB per process) and OUT/soak_rss.json
(the configuration, the outcomes by kind, the samples and the summary); prints a markdown table. Checks as
the reliability soak does that every request ended with one expected outcome and that every pool is full
again at the end (exit 1 otherwise). OUT defaults to $OUT, else ./soak_rss.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import random
import sys
import time
from collections import Counter
from pathlib import Path

import grpc

from sparsepd.launch import start, stop
from sparsepd.proto import sglang_scheduler_pb2 as pb
from sparsepd.proto import sglang_scheduler_pb2_grpc as pb_grpc

ROLES = ("router", "prefill-worker", "decode-worker")  # the children of serve, by their subcommand
EXPECTED = {f"{kind}:{end}" for kind in ("plain", "cancel", "abort") for end in ("length", "stop")}
EXPECTED |= {"cancel:cancelled", "abort:abort"}  # (stop: a stop string or a regex completed)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=20000, help="requests in all (default: %(default)s)")
    p.add_argument("--concurrency", type=int, default=32, help="requests in flight (default: %(default)s)")
    p.add_argument("--abort-share", type=float, default=0.2, help="share aborted (default: %(default)s)")
    p.add_argument("--sample-s", type=float, default=5.0, help="seconds between samples (default: %(default)s)")
    p.add_argument("--seed", type=int, default=2026)
    p.add_argument("--regexes", type=int, default=1000,
                   help="distinct regexes the grammar requests draw from (0: no grammar) (default: %(default)s)")
    p.add_argument("--serve-args", default="--num-slots 32 --num-pages 160 --max-batch-tokens 256",
                   help="added to `sparsepd serve --preset tiny` (default: %(default)r)")
    p.add_argument("--out", default=os.environ.get("OUT", "soak_rss"), help="output folder (default: $OUT)")
    return p.parse_args(argv)


def rss_mb(pid: int) -> float | None:
    """The process's resident memory in MB, None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def children_by_role(serve_pid: int) -> dict[str, int]:
    """The pids of serve's router and workers, from /proc (parent pid and command line)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            continue
        role = next((a.decode() for a in argv if a.decode() in ROLES), None)
        if ppid == serve_pid and role is not None:
            found[role] = int(entry.name)
    return found


def features(request: pb.GenerateRequest, rng: random.Random, regexes: int) -> None:
    """Give about a quarter of the requests one feature that keeps state somewhere: stop strings (the router's
    detokenizer), n = 2 (forked states), prompt and output log-probabilities, penalties (token history),
    a regex among `regexes` distinct ones (the grammar caches: 256 entries each, then least recently used out;
    0: none)."""
    sp, r = request.sampling_params, rng.random()
    if r < 0.08:
        sp.stop.append("ab")
    elif r < 0.13:
        sp.n = 2
    elif r < 0.18:
        request.return_logprob, request.logprob_start_len, request.top_logprobs_num = True, 0, 2
    elif r < 0.23:
        sp.frequency_penalty, sp.repetition_penalty = 0.5, 1.1
    elif r < 0.25 and regexes:
        sp.regex = f"[a-z]{{{rng.randrange(1, regexes + 1)}}}"


async def one_request(stub, i: int, rng: random.Random, abort_share: float, regexes: int,
                      errors: dict[str, str]) -> str:
    """A short request (1-40 prompt ids, 1-6 new tokens, streamed or not, some with a feature), cancelled or
    aborted at a random moment for `abort_share` of them; its outcome as "kind:how it ended" (the first error
    of each kind with its message and the request, in `errors`)."""
    ids = [256, *(rng.randrange(256) for _ in range(rng.randrange(1, 40)))]
    sampling = pb.SamplingParams(temperature=0.0, top_p=1.0, top_k=-1, ignore_eos=True,
                                 max_new_tokens=rng.randrange(1, 7))
    request = pb.GenerateRequest(request_id=f"soak-{i}", tokenized=pb.TokenizedInput(input_ids=ids),
                                 sampling_params=sampling, stream=rng.random() < 0.5)
    features(request, rng, regexes)
    kind = "cancel" if rng.random() < abort_share / 2 else "abort" if rng.random() < abort_share / 2 else "plain"

    async def collect() -> str:
        finish = None
        async for response in stub.Generate(request, timeout=120):
            if response.HasField("complete"):
                finish = response.complete.finish_reason
        return finish or "NO_COMPLETE"

    task = asyncio.ensure_future(collect())
    if kind != "plain":
        await asyncio.sleep(rng.uniform(0.0, 0.08))
        if kind == "cancel":
            task.cancel()
        else:
            await stub.Abort(pb.AbortRequest(request_id=request.request_id))
    try:
        return f"{kind}:{await task}"
    except asyncio.CancelledError:
        return "cancel:cancelled"
    except grpc.aio.AioRpcError as exc:
        outcome = f"{kind}:{exc.code().name}"
        errors.setdefault(outcome, f"{exc.details()} (request: {request})".replace("\n", " "))
        return outcome


async def all_free(stub, timeout_s: float = 60.0) -> bool:
    """Every worker's pages and slots free and nothing in flight in the router, within timeout_s."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        loads = (await stub.GetLoads(pb.GetLoadsRequest())).loads
        info = (await stub.GetServerInfo(pb.GetServerInfoRequest())).scheduler_info
        if info["in_flight"] == 0 and all((x.free_pages, x.free_slots) == (x.num_pages, x.num_slots) for x in loads):
            return True
        await asyncio.sleep(0.2)
    return False


async def soak(args: argparse.Namespace, address: str, pids: dict[str, int]) -> dict:
    rng = random.Random(args.seed)
    outcomes: Counter = Counter()
    errors: dict[str, str] = {}
    samples: list[dict] = []
    done = 0
    started = time.monotonic()

    def sample() -> None:
        samples.append({"t_s": round(time.monotonic() - started, 2), "requests": done,
                        **{role: rss_mb(pid) for role, pid in pids.items()}})

    async def sampler() -> None:
        while True:
            sample()
            await asyncio.sleep(args.sample_s)

    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.SglangSchedulerStub(channel)
        gate, tenth = asyncio.Semaphore(args.concurrency), max(1, args.requests // 10)
        sampling = asyncio.ensure_future(sampler())

        async def guarded(i: int, seed: int) -> None:
            nonlocal done
            try:
                outcomes[await one_request(stub, i, random.Random(seed), args.abort_share, args.regexes, errors)] += 1
            finally:
                done += 1
                if done % tenth == 0:
                    sample()
                    print(f"{done} requests, {time.monotonic() - started:.0f} s: "
                          + ", ".join(f"{r} {samples[-1][r]:.0f} MB" for r in pids), file=sys.stderr, flush=True)
                gate.release()

        tasks = []
        for i in range(args.requests):
            await gate.acquire()
            tasks.append(asyncio.ensure_future(guarded(i, rng.randrange(2**31))))
        await asyncio.gather(*tasks)
        elapsed = time.monotonic() - started
        free = await all_free(stub)
        sampling.cancel()
        sample()
    return {"outcomes": dict(outcomes), "errors": errors, "samples": samples, "elapsed_s": elapsed, "pools_free": free}


def at(samples: list[dict], requests: int) -> dict:
    """The first sample taken once `requests` requests were done."""
    return next(s for s in samples if s["requests"] >= requests)


def slope_mb_per_1000(samples: list[dict], role: str) -> float:
    """Least-squares slope of RSS against requests done, over the second half of the run."""
    half = samples[-1]["requests"] / 2
    points = [(s["requests"], s[role]) for s in samples if s["requests"] >= half and s[role] is not None]
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    var = sum((x - mx) ** 2 for x, _ in points)
    return 1000 * sum((x - mx) * (y - my) for x, y in points) / var if var else 0.0


def summarize(samples: list[dict], requests: int, roles: list[str]) -> dict:
    marks = {"start": samples[0], "10%": at(samples, requests // 10), "50%": at(samples, requests // 2),
             "end": samples[-1]}
    return {role: {**{k: s[role] for k, s in marks.items()},
                   "growth_10%_to_end": marks["end"][role] - marks["10%"][role],
                   "slope_mb_per_1000_requests_second_half": slope_mb_per_1000(samples, role),
                   "max": max(s[role] for s in samples if s[role] is not None)} for role in roles}


def table(summary: dict) -> str:
    head = ("| process | start MB | at 10 % | at 50 % | end | max | 10 % → end | slope, 2nd half (MB / 1k req) |\n"
            "|---|---|---|---|---|---|---|---|")
    rows = [f"| {role} | {s['start']:.0f} | {s['10%']:.0f} | {s['50%']:.0f} | {s['end']:.0f} | {s['max']:.0f} | "
            f"{s['growth_10%_to_end']:+.1f} | {s['slope_mb_per_1000_requests_second_half']:+.2f} |"
            for role, s in summary.items()]
    return "\n".join([head, *rows])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    commit = _commit()  # the code serve runs: read before it starts
    serve = start("serve", ["serve", "--preset", "tiny", "--port", "0", "--metrics-port", "-1",
                            *args.serve_args.split()], timeout_s=300)
    try:
        pids = {"serve": serve.pid, **children_by_role(serve.pid)}
        if set(pids) != {"serve", *ROLES}:
            print(f"error: found {pids} among serve's children, expected {ROLES}", file=sys.stderr)
            return 1
        result = asyncio.run(soak(args, serve.ready["grpc"], pids))
    finally:
        code = stop(serve, timeout_s=60)
    roles = list(pids)
    summary = summarize(result["samples"], args.requests, roles)
    with open(out / "soak_rss.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["t_s", "requests", *roles])
        writer.writeheader()
        writer.writerows(result["samples"])
    record = {"config": vars(args), "commit": commit, "serve_exit_code": code, **result, "summary": summary}
    (out / "soak_rss.json").write_text(json.dumps(record, indent=1) + "\n")
    unexpected = {k: v for k, v in result["outcomes"].items() if k not in EXPECTED}
    print(f"{args.requests} requests in {result['elapsed_s']:.0f} s at concurrency {args.concurrency}, "
          f"{args.abort_share:.0%} aborted; outcomes {result['outcomes']}; pools free at the end: "
          f"{result['pools_free']}; serve exited {code}; {len(result['samples'])} samples in {out}\n")
    print(table(summary))
    if unexpected or not result["pools_free"] or sum(result["outcomes"].values()) != args.requests or code != 0:
        print(f"error: unexpected outcomes {unexpected} ({result['errors']}), pools free {result['pools_free']}, "
              f"serve exit {code}", file=sys.stderr)
        return 1
    return 0


def _commit() -> str | None:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=10).stdout.strip() or None
    except OSError:
        return None


if __name__ == "__main__":
    sys.exit(main())
