"""P→D state transfer between two processes on one host: one request's state (a preset's shapes at a context
length) pushed by TransferSender to a TransferReceiver in another process, like a decode worker, over
ipc:// and tcp://127.0.0.1, without a checksum and with each algorithm, one state or several in flight.

Default states: bench@4096 (3.6 MB), v4-flash@4096 (44 MB), v4-flash@32768 (224 MB). Per row: ms per state
(send() until the Ack, median of the rounds / states in flight) and GB/s; the CPU time each process spent
per state (all its threads, the zmq I/O thread included: where the time goes when the cores are shared);
the checksum's own throughput over this state's tensors (one thread, here); and the floor, one memcpy of
the state. A loopback socket copies every byte twice (into the kernel on the sender's zmq I/O thread, out
of it on the receiver's), so a state costs at least two memcpys of CPU, one on each side.

--device cuda (the GPU variant): the state lives on the sender's GPU and is copied into pinned host buffers
(reused, as the engine's export does) before each send, and the receiver copies every state it accepts to
its GPU before acking: the time covers device → host → socket → host → device.

    python bench/bench_transfer.py [--states bench@4096,v4-flash@4096,v4-flash@32768] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import tempfile
import time
import zlib

import torch

from sparsepd.decode_worker.transfer_receiver import TransferReceiver
from sparsepd.engine.pools import KVPools, PoolConfig, plan_geometry
from sparsepd.engine.state_io import StateDescriptor, expected_specs
from sparsepd.model_config import get_preset
from sparsepd.prefill_worker.transfer_sender import TransferSender
from sparsepd.proto.transfer import TransferHeader, model_fingerprint

try:
    import crc32c
except ImportError:
    crc32c = None

CHECKSUM_FNS = {"crc32": zlib.crc32, **({"crc32c": crc32c.crc32c} if crc32c is not None else {})}


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


def checksum_gbps(name: str, tensors: dict[str, torch.Tensor]) -> float:
    """The algorithm alone over the state's tensors (one thread), best of three."""
    views = [memoryview(t.reshape(-1).view(torch.uint8).numpy()) for t in tensors.values()]
    fn, times = CHECKSUM_FNS[name], []
    for _ in range(3):
        t0 = time.perf_counter()
        for view in views:
            fn(view)
        times.append(time.perf_counter() - t0)
    return sum(v.nbytes for v in views) / min(times) / 1e9


def _serve(endpoint: str, fingerprint: str, specs, tickets: list[str], device: str, retain: bool, conn) -> None:
    """The receiving side, in its own process like a decode worker: every ticket opened up front; answers
    "cpu" with its process CPU time (all threads) until "stop"."""
    torch.set_num_threads(1)

    def on_state(tid, descriptor, tensors):
        if device == "cuda":  # the import step: onto the device before the ack
            for t in tensors.values():
                t.to(device)
            torch.cuda.synchronize()

    receiver = TransferReceiver(endpoint, fingerprint, on_state, **({} if retain else {"retain_memory": False}))
    for tid in tickets:
        receiver.expect(tid, "r" + tid, specs, 3600.0)
    conn.send(receiver.endpoint)
    while conn.recv() == "cpu":
        conn.send(time.process_time())
    conn.send(dict(receiver.stats))
    receiver.close()


def measure(endpoint: str, descriptor, tensors, fingerprint: str, configs: list[tuple[str, int]], args) -> list[dict]:
    """One receiving process for every (checksum, in_flight) config; per config the medians over the rounds."""
    rounds = args.repeats + 2  # the first two connect and warm up
    tickets = {c: [f"{c[0]}-{c[1]}-{r}-{i}" for r in range(rounds) for i in range(c[1])] for c in configs}
    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    child = ctx.Process(target=_serve, args=(endpoint, fingerprint, descriptor.tensors,
                                             [t for ts in tickets.values() for t in ts], args.device,
                                             not args.no_retain, there))
    child.start()
    rows = []
    try:
        bound = here.recv()
        pinned = None
        if args.device == "cuda":  # the export step's pinned host buffers, one set per state in flight
            n = max(c[1] for c in configs)
            pinned = [{k: torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for k, t in tensors.items()}
                      for _ in range(n)]
        for checksum, in_flight in configs:
            sender = TransferSender(checksum=False if checksum == "off" else checksum, ack_timeout_s=120)
            try:
                rows.append(_rounds(sender, bound, here, descriptor, tensors, pinned, fingerprint,
                                    tickets[(checksum, in_flight)], in_flight, rounds)
                            | {"checksum": checksum, "in_flight": in_flight})
            finally:
                sender.close()
        here.send("stop")
        assert here.recv()["accepted"] == sum(len(t) for t in tickets.values())
        return rows
    finally:
        child.join(timeout=60)
        if child.is_alive():
            child.kill()


def _rounds(sender, bound, conn, descriptor, tensors, pinned, fingerprint, tickets, in_flight, rounds) -> dict:
    headers = [TransferHeader.from_descriptor(descriptor, transfer_id=tid, request_id="r" + tid,
                                              fingerprint=fingerprint) for tid in tickets]
    wall, send_cpu, recv_cpu = [], [], []
    for r in range(rounds):
        conn.send("cpu")
        child0, own0, t0 = conn.recv(), time.process_time(), time.perf_counter()
        futures = []
        for i, header in enumerate(headers[r * in_flight: (r + 1) * in_flight]):
            payload = tensors
            if pinned is not None:  # device → pinned host, as export_state does
                payload = {k: pinned[i][k].copy_(t, non_blocking=True) for k, t in tensors.items()}
                torch.cuda.synchronize()
            futures.append(sender.send(bound, header, payload))
        acks = [f.result() for f in futures]
        elapsed, own = time.perf_counter() - t0, time.process_time() - own0
        conn.send("cpu")
        child = conn.recv() - child0
        assert all(a.ok for a in acks), [a.reason for a in acks if not a.ok]
        if r >= 2:
            wall.append(elapsed / in_flight)
            send_cpu.append(own / in_flight)
            recv_cpu.append(child / in_flight)
    return {"s": statistics.median(wall), "best_s": min(wall), "send_cpu_s": statistics.median(send_cpu),
            "recv_cpu_s": statistics.median(recv_cpu)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--states", default="bench@4096,v4-flash@4096,v4-flash@32768", help="PRESET@POSITION,...")
    p.add_argument("--transports", default="ipc,tcp")
    p.add_argument("--checksums", default="off,crc32c,crc32", help="off and/or algorithm names")
    p.add_argument("--in-flight", default="1,4", help="states sent before waiting for their acks")
    p.add_argument("--repeats", type=int, default=5, help="measured rounds per row (after two warm-up rounds)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--no-retain", action="store_true", help="receiver without retain_memory (glibc's defaults)")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here")
    checksums = args.checksums.split(",")
    for name in checksums:
        if name != "off" and name not in CHECKSUM_FNS:
            p.error(f"--checksums: {name!r} is not available here; choose from off, {', '.join(CHECKSUM_FNS)}")
    configs = [(c, int(n)) for c in checksums for n in args.in_flight.split(",")]
    print(f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{args.repeats} rounds per row (median)")
    print("| state | MB | transport | checksum | in flight | ms per state | GB/s | best GB/s | sender CPU ms | "
          "receiver CPU ms | checksum alone GB/s | memcpy floor ms |")
    print("|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for spec in args.states.split(","):
        preset, position = spec.split("@")
        descriptor, tensors = state(preset, int(position))
        nbytes = descriptor.num_bytes
        floor_ms = nbytes / memcpy_gbps(nbytes) / 1e6
        alone = {name: checksum_gbps(name, tensors) for name in checksums if name != "off"}
        if args.device == "cuda":
            tensors = {k: t.to("cuda") for k, t in tensors.items()}
        fingerprint = model_fingerprint(get_preset(preset))
        with tempfile.TemporaryDirectory() as tmp:
            for transport in args.transports.split(","):
                endpoint = "tcp://127.0.0.1:0" if transport == "tcp" else f"ipc://{tmp}/bench.sock"
                for row in measure(endpoint, descriptor, tensors, fingerprint, configs, args):
                    alone_gbps = f"{alone[row['checksum']]:.1f}" if row["checksum"] in alone else "-"
                    gbps, best = nbytes / row["s"] / 1e9, nbytes / row["best_s"] / 1e9
                    print(f"| {spec} | {nbytes / 1e6:.1f} | {transport} | {row['checksum']} | {row['in_flight']} | "
                          f"{row['s'] * 1e3:.1f} | {gbps:.2f} | {best:.2f} | {row['send_cpu_s'] * 1e3:.0f} | "
                          f"{row['recv_cpu_s'] * 1e3:.0f} | {alone_gbps} | {floor_ms:.1f} |", flush=True)


if __name__ == "__main__":
    main()
