"""A real deployment on 127.0.0.1 for the router tests: one decode and one prefill worker (small pools, so
32 streams overflow the decode slots and exercise the wait for room) and a router in front, stopped by
pid after the module."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from router_helpers import WORKER_ARGS, start_router  # noqa: E402

from sparsepd.deploy.launch import start, stop  # noqa: E402


@pytest.fixture(scope="module")
def deployment():
    children = []
    try:
        children.append(start("decode", ["decode-worker", *WORKER_ARGS, "--reservation-ttl", "20"]))
        children.append(start("prefill", ["prefill-worker", *WORKER_ARGS, "--transfer-timeout", "5"]))
        decode, prefill = children[0].ready["grpc"], children[1].ready["grpc"]
        children.append(start_router(prefill, decode))
        yield {"decode": decode, "prefill": prefill, "router": children[2].ready["grpc"],
               "metrics": children[2].ready["metrics"], "children": children}
    finally:
        for child in reversed(children):
            stop(child)
