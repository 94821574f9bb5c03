"""`sparsepd decode-worker`: one decode process (control server + state receiver + decode loop). With
--colocated it also serves the prefill control API and prefills in its own engine (no transfer): the
single-engine baseline behind the same router. With --router it registers itself there."""

from __future__ import annotations

import argparse
import asyncio
import logging
import threading

import grpc

from sparsepd.cluster_token import derive_key, server_interceptors, token_from_args
from sparsepd.decode_worker.colocated import ROLE, ColocatedPrefillService
from sparsepd.decode_worker.service import DecodeService
from sparsepd.decode_worker.transfer_receiver import TransferReceiver
from sparsepd.decode_worker.worker import DecodeWorker
from sparsepd.engine.config import EngineConfig, engine_config_from_args, with_prefix_cache
from sparsepd.engine.engine import Engine
from sparsepd.engine.group import join_group
from sparsepd.faults import Faults
from sparsepd.fingerprint import deployment_fingerprint
from sparsepd.process import freeze_startup_heap, print_ready, setup_logging, stop_on_signals
from sparsepd.proto import worker_pb2_grpc
from sparsepd.registration import start_registration
from sparsepd.tls import add_port, tls_from_args

log = logging.getLogger("sparsepd.decode")


async def serve(args: argparse.Namespace) -> int:
    setup_logging("decode", args.log_level)
    token, tls = token_from_args(args), tls_from_args(args)
    group = join_group(args)  # a rank of a worker group (engine/group.py), or None
    if group is not None:
        args.device = group.spec.device  # this rank's device: the memory plan's defaults follow it
    cfg = with_prefix_cache(engine_config_from_args(args), args, enabled=args.colocated)
    cfg = EngineConfig.model_validate({**cfg.model_dump(), "max_retracted_memory": args.max_retracted_memory})
    if group is not None:
        cfg = group.engine_config(cfg)
        if cfg.speculative_num_steps:
            raise ValueError("--speculative-num-steps is not supported in an expert-parallel group (--ep)")
    model = group.build_model(cfg) if group is not None else cfg.build_model()
    engine = Engine(model, cfg.pools, cuda_graph=cfg.cuda_graph, overlap=cfg.overlap,
                    vocabulary=cfg.vocabulary(model.cfg), max_retracted_bytes=cfg.max_retracted_memory,
                    speculative_num_steps=cfg.speculative_num_steps, mtp=cfg.build_mtp(model), gpu_wait=cfg.gpu_wait,
                    prefill_graph=cfg.prefill_cuda_graph)
    engine.capture_graphs(cfg.graph_max_context)
    fingerprint = deployment_fingerprint(cfg.preset, cfg.checkpoint, cfg.seed, **cfg.load.model_dump())
    log.info("%s", engine.memory_plan())
    worker = DecodeWorker(engine, max_ttl_s=args.reservation_ttl, faults=Faults.from_env())
    worker.group = group
    receiver = TransferReceiver(args.zmq_endpoint, fingerprint, worker.on_state, expected=worker.expected,
                                auth_key=derive_key(token, "transfer") if token is not None else None)
    worker.cancel_transfer = receiver.cancel
    worker.expect_transfer = receiver.expect
    worker.transfer_stats = lambda: {k: v for k, v in receiver.stats.items() if isinstance(v, int)}
    loop_thread = threading.Thread(target=worker.run, name="decode-loop", daemon=True)
    loop_thread.start()
    server = grpc.aio.server(interceptors=server_interceptors(token))
    role = ROLE if args.colocated else "decode"
    endpoint = args.zmq_advertise or receiver.endpoint
    if "//0.0.0.0:" in endpoint or "//*:" in endpoint:
        receiver.close()
        raise ValueError(f"the transfer receiver listens on {endpoint}: give --zmq-advertise, the endpoint prefill "
                         "workers can reach")
    service = DecodeService(worker, endpoint, fingerprint, role=role)
    worker_pb2_grpc.add_DecodeWorkerServicer_to_server(service, server)
    if args.colocated:
        worker_pb2_grpc.add_PrefillWorkerServicer_to_server(ColocatedPrefillService(worker, service), server)
    port = add_port(server, f"{args.host}:{args.port}", tls)
    await server.start()
    stop = stop_on_signals(asyncio.get_running_loop())
    worker.faults.hit("decode.start")  # drills: a worker that dies before it is ready
    load = engine.load()
    address, registration = start_registration(args, port, log, role, fingerprint, load.num_pages,
                                               load.num_slots, endpoint, token=token, tls=tls)
    freeze_startup_heap(log)
    print_ready(role, grpc=address, zmq=endpoint, fingerprint=fingerprint,
                pages=load.num_pages, slots=load.num_slots)
    await stop.wait()
    if group is not None:
        group.stopping = True
    if registration is not None:
        registration.cancel()
    service.serving = False  # Reserve answers UNAVAILABLE, Health says not serving: the router sends no more
    await drain(worker, args.drain_timeout)
    await server.stop(grace=2.0)
    worker.stop_event.set()
    loop_thread.join(timeout=5)
    receiver.close()
    return 0


async def drain(worker: DecodeWorker, timeout_s: float) -> None:
    """Let the requests here finish for up to timeout_s, then abort the rest (their streams get "abort")."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    if worker.busy():
        log.info("stopping: no new requests; draining for up to %.0f s", timeout_s)
    while worker.busy() and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
    aborted = worker.release_all()
    if aborted:
        log.warning("stopping: aborted %d requests still running after the drain", aborted)
        await asyncio.sleep(0.3)  # let the abort events reach the router
    log.info("stopped taking work; closing")

