"""P→D transfer faults through the public API (SPARSEPD_TRANSFER_FAULT, real processes on 127.0.0.1).

On the prefill worker: a dropped message, a truncated one, a corrupted one, one delayed past the decode
worker's --reservation-ttl. On the decode worker: an ack dropped, an ack delayed past the prefill worker's
--transfer-timeout. And a decode worker whose advertised endpoint nothing listens on. Each faulty request
ends with one clear error (bounded by a gRPC deadline: no hang), both workers' pages and slots come back
exactly (free == total: nothing leaked, nothing freed twice), and — the faults being limited to one
transfer (@1) — the next request through the same workers gets the single-process reference tokens.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from rel_helpers import (  # noqa: E402
    Fleet,
    channel,
    generate_request,
    outcome_of,
    reference,
    router_outcomes,
    run,
    stub_of,
    wait_all_free,
    wait_worker_free,
)

TRANSFER_TIMEOUT = ["--transfer-timeout", "2"]
RESERVATION_TTL_S = 2


def _fault(plan: str) -> dict:
    return {"SPARSEPD_TRANSFER_FAULT": plan}


def _nothing_listens() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


# (prefill worker, decode worker, fragments the error message must hold)
CASES = {
    "drop": ("p_drop", "d_ok", ["state transfer failed", "no ack within 2s", "dropped the message"]),
    "truncate": ("p_truncate", "d_ok", ["decode worker rejected the state", "truncated"]),
    "corrupt": ("p_corrupt", "d_ok", ["decode worker rejected the state", "crc32", "corrupted"]),
    "delay_past_ttl": ("p_delay", "d_ok", ["decode worker rejected the state", "reservation expired"]),
    "drop_ack": ("p_ok", "d_drop_ack", ["state transfer failed", "no ack within 2s", "connected"]),
    "delay_ack": ("p_ok", "d_delay_ack", ["state transfer failed", "no ack within 2s", "connected"]),
    "unreachable": ("p_ok", "d_unreachable", ["state transfer failed", "never accepted a connection"]),
}


@pytest.fixture(scope="module")
def fleet():
    fleet = Fleet()
    try:
        fleet.workers(
            p_ok=("prefill", None, TRANSFER_TIMEOUT),
            d_ok=("decode", None, ["--reservation-ttl", str(RESERVATION_TTL_S)]),
            p_drop=("prefill", _fault("drop@1"), TRANSFER_TIMEOUT),
            p_truncate=("prefill", _fault("truncate@1"), TRANSFER_TIMEOUT),
            p_corrupt=("prefill", _fault("corrupt@1"), TRANSFER_TIMEOUT),
            p_delay=("prefill", _fault(f"delay:{RESERVATION_TTL_S + 1.5}@1"), ["--transfer-timeout", "10"]),
            d_drop_ack=("decode", _fault("drop_ack@1"), []),
            d_delay_ack=("decode", _fault("delay_ack:4@1"), []),
            d_unreachable=("decode", None, ["--zmq-advertise", _nothing_listens()]),
        )
        fleet.routers(**{f"router_{case}": ([fleet[p]], [fleet[d]], []) for case, (p, d, _) in CASES.items()})
        yield fleet
    finally:
        fleet.stop_all()


@pytest.mark.parametrize("case", list(CASES))
def test_transfer_fault_ends_the_request_and_frees_both_sides(fleet, case):
    prefill_name, decode_name, fragments = CASES[case]
    prefill, decode, router = fleet[prefill_name], fleet[decode_name], fleet[f"router_{case}"]
    prompt, later_prompt = [256, *f"fault {case}".encode()], [256, *f"after {case}".encode()]
    recovers = case != "unreachable"  # the fault is permanent there

    async def main():
        async with channel(router.ready["grpc"]) as ch:
            stub = stub_of(ch)
            faulty = await outcome_of(stub, generate_request(prompt, 6, request_id=f"{case}-faulty"), timeout=30)
            await wait_all_free(stub, timeout=15)
            if not recovers:
                return faulty, None
            later = await outcome_of(stub, generate_request(later_prompt, 6, request_id=f"{case}-later"), timeout=30)
            await wait_all_free(stub, timeout=15)
            return faulty, later

    (code, details, ids), later = run(main())
    assert (code, ids) == ("UNAVAILABLE", []), (code, details)
    assert f"prefill worker {prefill.ready['grpc']}" in details and all(f in details for f in fragments), details
    if recovers:
        assert later == ("length", "", reference(later_prompt, 6))
    assert router_outcomes(router) == ({"unavailable": 1, "length": 1} if recovers else {"unavailable": 1})
    for worker in (prefill, decode):  # asked directly too: free == total, not more (no double free)
        stats = run(wait_worker_free(worker))
        assert (stats.free_pages, stats.free_slots) == (stats.num_pages, stats.num_slots)
