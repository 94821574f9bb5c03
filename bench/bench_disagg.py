"""P→D state transfer on one GPU (`bench` preset): for 4K and 32K prompts over tcp and ipc, the time to
prefill, copy the state out (device → pinned host), push it over zmq, and copy it into the decode pools;
the transfer's GB/s as a fraction of the pinned-host copy bandwidth measured in the same run; and its share
of the time to first token. Prefill and decode engines live in one process here (two pools on one GPU) and
talk through real zmq sockets; the worker processes use the same code paths. Prints a markdown table.

    python3 -P bench/bench_disagg.py [--lengths 4096,32768] [--checksum]
"""

from __future__ import annotations

import argparse
import queue
import time

import torch

from sparsepd.decode_worker.transfer_receiver import TransferReceiver
from sparsepd.engine.engine import Engine
from sparsepd.engine.pools import PoolConfig
from sparsepd.engine.sampling import SamplingParams
from sparsepd.engine.state_io import expected_specs, export_state, import_state
from sparsepd.model.weights import build_model
from sparsepd.model_config import get_preset
from sparsepd.prefill_worker.transfer_sender import TransferSender
from sparsepd.proto.transfer import TransferHeader, model_fingerprint


def pinned_copy_gbps(nbytes: int = 1 << 30) -> tuple[float, float]:
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    out = []
    for dst, src in ((host, dev), (dev, host)):
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(5):
            dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        out.append(5 * nbytes / (time.perf_counter() - t) / 1e9)
    return out[0], out[1]  # device→host, host→device


def one(p: Engine, d: Engine, sender, receiver, inbox, endpoint, fp, length, seed) -> dict:
    cfg = p.model.cfg
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    prompt = torch.randint(0, cfg.vocab_size, (length,), generator=torch.Generator().manual_seed(seed)).tolist()
    dreq = d.make_request([0] * length, params, f"d{seed}")
    d.scheduler.reserve(dreq)
    tid = f"{seed:032x}"
    receiver.expect(tid, dreq.request_id, deadline_s=120, max_pages=len(dreq.pages))
    sync = torch.cuda.synchronize if p.pools.device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    preq = p.submit(prompt, params, dreq.request_id)
    while not preq.output_ids:
        p.step()
    sync()
    t1 = time.perf_counter()
    descriptor, tensors = export_state(p.pools, preq)
    p.abort(preq.request_id)
    t2 = time.perf_counter()
    header = TransferHeader.from_descriptor(descriptor, transfer_id=tid, request_id=dreq.request_id, fingerprint=fp)
    ack = sender.send(endpoint, header, tensors).result()
    t3 = time.perf_counter()
    assert ack.ok, ack.reason
    _, got_descriptor, got = inbox.get(timeout=60)
    import_state(d.pools, dreq, got_descriptor, got)
    sync()
    t4 = time.perf_counter()
    d.scheduler.release(dreq)
    return dict(bytes=descriptor.num_bytes, prefill=t1 - t0, export=t2 - t1, transfer=t3 - t2, import_=t4 - t3,
                ttft=t4 - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--lengths", default="4096,32768")
    ap.add_argument("--checksum", action="store_true", help="crc32 every frame (off: a trusted local link)")
    ap.add_argument("--preset", default="bench")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    cfg = get_preset(args.preset)
    model = build_model(cfg, seed=0, device=args.device)
    pages = 2 * (-(-(max(lengths) + 64) // cfg.page_size))
    pool = PoolConfig(num_slots=2, max_batch_tokens=8192, num_pages=pages)
    p, d = Engine(model, pool), Engine(model, pool)
    fp = model_fingerprint(cfg)
    d2h, h2d = pinned_copy_gbps() if args.device == "cuda" else (float("nan"), float("nan"))
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"# {device_name}: pinned copy device→host {d2h:.1f} GB/s, host→device {h2d:.1f} GB/s; "
          f"crc32 {'on' if args.checksum else 'off'}", flush=True)
    print("\n| transport | prompt | state MB | prefill ms | export ms | transfer ms | import ms | TTFT ms | "
          "transfer GB/s | vs pinned D→H | transfer share of TTFT |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for transport in ("tcp://127.0.0.1:0", "ipc:///tmp/sparsepd-bench.sock"):
        inbox: queue.Queue = queue.Queue()
        receiver = TransferReceiver(transport, fp, lambda *a, inbox=inbox: inbox.put(a),
                                    expected=lambda tid, n: expected_specs(d.pools, n))
        sender = TransferSender(checksum=args.checksum, ack_timeout_s=60)
        try:
            # warm up kernels and sockets
            one(p, d, sender, receiver, inbox, receiver.endpoint, fp, min(lengths), seed=1)
            for i, length in enumerate(lengths):
                r = one(p, d, sender, receiver, inbox, receiver.endpoint, fp, length, seed=10 + i)
                gbps = r["bytes"] / r["transfer"] / 1e9
                print(f"| {transport.split(':')[0]} | {length} | {r['bytes'] / 1e6:.1f} | {r['prefill'] * 1e3:.0f} | "
                      f"{r['export'] * 1e3:.1f} | {r['transfer'] * 1e3:.1f} | {r['import_'] * 1e3:.1f} | "
                      f"{r['ttft'] * 1e3:.0f} | {gbps:.2f} | {gbps / d2h:.0%} | {r['transfer'] / r['ttft']:.1%} |",
                      flush=True)
        finally:
            sender.close()
            receiver.close()


if __name__ == "__main__":
    main()
