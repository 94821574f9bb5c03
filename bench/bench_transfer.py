"""P→D state transfer throughput: one request's state (shapes of a preset at a context length) pushed by
TransferSender to a TransferReceiver in another process over tcp loopback and ipc, one at a time and with
several in flight.

Floor = bytes / host memcpy bandwidth measured in the same run (one copy of the state; a loopback socket
copies at least twice: into the kernel and out of it). Time = send() until the Ack, median of the runs.

    python bench/bench_transfer.py --preset v4-flash --position 8192
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import tempfile
import time

import torch

from sparsepd.decode_worker.transfer_receiver import TransferReceiver
from sparsepd.engine.pools import KVPools, PoolConfig, plan_geometry
from sparsepd.engine.state_io import StateDescriptor, expected_specs
from sparsepd.model.config import get_preset
from sparsepd.prefill_worker.transfer_sender import TransferSender
from sparsepd.proto.transfer import TransferHeader, model_fingerprint


def state(preset: str, position: int) -> tuple[StateDescriptor, dict[str, torch.Tensor]]:
    cfg = get_preset(preset)
    num_pages = -(-position // cfg.page_size)
    pools = KVPools(cfg, plan_geometry(cfg, PoolConfig(num_slots=1, max_batch_tokens=16, num_pages=num_pages),
                                       torch.device("cpu")), "cpu")
    specs = expected_specs(pools, num_pages)
    del pools
    gen = torch.Generator().manual_seed(0)
    tensors = {s.name: torch.randint(0, 256, (torch.Size(s.shape).numel() * getattr(torch, s.dtype).itemsize,),
                                     dtype=torch.uint8, generator=gen).view(getattr(torch, s.dtype)).view(s.shape)
               for s in specs}
    return StateDescriptor(position=position, num_pages=num_pages, output_ids=(1,), sampler_state=b"\0" * 64,
                           tensors=specs), tensors


def memcpy_gbps(nbytes: int) -> float:
    src, dst = torch.empty(nbytes, dtype=torch.uint8).fill_(1), torch.empty(nbytes, dtype=torch.uint8)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return nbytes / min(times) / 1e9


def _serve(endpoint: str, fingerprint: str, specs, tickets: list[str], conn) -> None:
    """The receiving side, in its own process like a decode worker: every ticket opened up front."""
    receiver = TransferReceiver(endpoint, fingerprint, lambda tid, d, t: None)
    for tid in tickets:
        receiver.expect(tid, "r" + tid, specs, 600.0)
    conn.send(receiver.endpoint)
    conn.recv()  # stop
    conn.send(dict(receiver.stats))
    receiver.close()


def run(endpoint: str, descriptor, tensors, fingerprint: str, checksum: bool, in_flight: int, repeats: int) -> float:
    """Median seconds per transfer (wall time of a round of in_flight transfers / in_flight)."""
    tickets = [f"t{r}-{i}" for r in range(repeats + 2) for i in range(in_flight)]
    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    child = ctx.Process(target=_serve, args=(endpoint, fingerprint, descriptor.tensors, tickets, there))
    child.start()
    sender = TransferSender(checksum=checksum, ack_timeout_s=60)
    try:
        bound = here.recv()
        headers = [TransferHeader.from_descriptor(descriptor, transfer_id=tid, request_id="r" + tid,
                                                  fingerprint=fingerprint) for tid in tickets]
        times = []
        for r in range(repeats + 2):  # the first two rounds connect and warm up
            round_headers = headers[r * in_flight: (r + 1) * in_flight]
            t0 = time.perf_counter()
            acks = [f.result() for f in [sender.send(bound, h, tensors) for h in round_headers]]
            elapsed = time.perf_counter() - t0
            assert all(a.ok for a in acks), [a.reason for a in acks if not a.ok]
            if r >= 2:
                times.append(elapsed / in_flight)
        here.send("stop")
        assert here.recv()["accepted"] == len(tickets)
        return statistics.median(times)
    finally:
        sender.close()
        child.join(timeout=30)
        if child.is_alive():
            child.kill()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--preset", default="v4-flash")
    p.add_argument("--position", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    descriptor, tensors = state(args.preset, args.position)
    nbytes = descriptor.num_bytes
    fingerprint = model_fingerprint(get_preset(args.preset))
    gbps = memcpy_gbps(nbytes)
    floor_ms = nbytes / gbps / 1e6
    print(f"{args.preset} at position {args.position}: {len(tensors)} tensors, {nbytes / 2**20:.1f} MiB; "
          f"memcpy {gbps:.1f} GB/s → floor {floor_ms:.2f} ms")
    print("| transport | crc32 | in flight | ms per state | GB/s | floor ms | % of floor |")
    print("|---|---|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for transport in ("tcp", "ipc"):
            endpoint = "tcp://127.0.0.1:0" if transport == "tcp" else f"ipc://{tmp}/bench.sock"
            for checksum in (False, True):
                for in_flight in (1, 8):
                    s = run(endpoint, descriptor, tensors, fingerprint, checksum, in_flight, args.repeats)
                    print(f"| {transport} | {'on' if checksum else 'off'} | {in_flight} | {s * 1e3:.2f} | "
                          f"{nbytes / s / 1e9:.2f} | {floor_ms:.2f} | {100 * floor_ms / (s * 1e3):.0f}% |")


if __name__ == "__main__":
    main()
