#!/usr/bin/env python3
"""What one long stop string costs the OpenAI gateway (smg): `sparsepd serve --http-port` (tiny, CPU), then one
`/v1/completions` request (4 tokens, greedy) per stop-string length, timing the request and the CPU seconds
the gateway and the router processes spent on it (from /proc). The gateway matches stop strings itself, so
the router's 4,096-character limit on gRPC does not protect it.

    .venv/bin/python bench/gateway_stop_cost.py [--lengths 0,4096,16384,50000,100000]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from sparsepd.launch import start, stop


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def children(parent: int) -> dict[str, int]:
    """serve's children by their command line: the router, the workers and the gateway (smg)."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            argv = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (FileNotFoundError, ProcessLookupError, ValueError, IndexError):
            continue
        if ppid == parent:
            role = "gateway" if "smg" in argv else next((r for r in ("router", "prefill-worker", "decode-worker")
                                                          if f" {r} " in argv), argv)
            out[role] = int(entry.name)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="0,4096,16384,50000,100000", help="stop-string lengths in characters")
    args = p.parse_args(argv)
    serve = start("serve", ["serve", "--port", "0", "--metrics-port", "-1", "--http-port", "0"], timeout_s=300)
    try:
        pids = children(serve.pid)
        if "gateway" not in pids or "router" not in pids:
            print(f"error: serve's children are {pids}", file=sys.stderr)
            return 1
        print("| stop string, characters | HTTP status | wall s | gateway CPU s | router CPU s |")
        print("|---|---|---|---|---|")
        for n in (int(x) for x in args.lengths.split(",")):
            body = {"model": serve.ready["model"], "prompt": "Hello", "max_tokens": 4, "temperature": 0,
                    **({"stop": ["x" * n]} if n else {})}
            request = urllib.request.Request(serve.ready["http"] + "/v1/completions", data=json.dumps(body).encode(),
                                             headers={"Content-Type": "application/json"})
            gateway, router, started = cpu_s(pids["gateway"]), cpu_s(pids["router"]), time.perf_counter()
            try:
                with urllib.request.urlopen(request, timeout=600) as r:
                    status = r.status
            except urllib.error.HTTPError as exc:
                status = exc.code
            print(f"| {n:,} | {status} | {time.perf_counter() - started:.2f} | {cpu_s(pids['gateway']) - gateway:.2f} "
                  f"| {cpu_s(pids['router']) - router:.2f} |", flush=True)
    finally:
        stop(serve, timeout_s=60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
