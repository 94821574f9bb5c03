"""`sparsepd prefill-worker`: one prefill process (control server + engine + state sender). With --router
it registers itself there."""

from __future__ import annotations

import argparse
import asyncio
import logging
import threading

import grpc

from sparsepd.cluster_token import derive_key, server_interceptors, token_from_args
from sparsepd.engine.config import engine_config_from_args, with_prefix_cache
from sparsepd.engine.engine import Engine
from sparsepd.engine.group import join_group
from sparsepd.faults import Faults
from sparsepd.fingerprint import deployment_fingerprint
from sparsepd.prefill_worker.service import PrefillService
from sparsepd.prefill_worker.transfer_sender import TransferSender
from sparsepd.prefill_worker.worker import PrefillWorker
from sparsepd.process import freeze_startup_heap, print_ready, setup_logging, stop_on_signals
from sparsepd.proto import worker_pb2_grpc
from sparsepd.registration import start_registration
from sparsepd.tls import add_port, tls_from_args

log = logging.getLogger("sparsepd.prefill")


async def serve(args: argparse.Namespace) -> int:
    setup_logging("prefill", args.log_level)
    token, tls = token_from_args(args), tls_from_args(args)
    group = join_group(args)  # a rank of a worker group (engine/group.py), or None
    if group is not None:
        args.device = group.spec.device  # this rank's device: the memory plan's defaults follow it
    cfg = with_prefix_cache(engine_config_from_args(args), args)
    if group is not None:
        cfg = group.engine_config(cfg)
        if cfg.speculative_num_steps:
            raise ValueError("--speculative-num-steps is not supported in an expert-parallel group (--ep)")
    model = group.build_model(cfg) if group is not None else cfg.build_model()
    # With speculative decoding the prefill runs the MTP layer over the prompt too: its state ships with the rest.
    engine = Engine(model, cfg.pools, vocabulary=cfg.vocabulary(model.cfg),
                    speculative_num_steps=cfg.speculative_num_steps, mtp=cfg.build_mtp(model), gpu_wait=cfg.gpu_wait,
                    prefill_graph=cfg.prefill_cuda_graph)
    fingerprint = deployment_fingerprint(cfg.preset, cfg.checkpoint, cfg.seed, **cfg.load.model_dump())
    log.info("%s", engine.memory_plan())
    sender = TransferSender(ack_timeout_s=args.transfer_timeout,
                            auth_key=derive_key(token, "transfer") if token is not None else None)
    worker = PrefillWorker(engine, sender, fingerprint, transfer_timeout_s=args.transfer_timeout,
                           faults=Faults.from_env())
    worker.group, ticking = group, threading.Event()
    if group is not None:  # the group's forwards go on while no batch runs here
        threading.Thread(target=worker.tick_idle, args=(ticking,), name="group-ticks", daemon=True).start()
    service = PrefillService(worker)
    server = grpc.aio.server(interceptors=server_interceptors(token))
    worker_pb2_grpc.add_PrefillWorkerServicer_to_server(service, server)
    port = add_port(server, f"{args.host}:{args.port}", tls)
    await server.start()
    stop = stop_on_signals(asyncio.get_running_loop())
    worker.faults.hit("prefill.start")  # drills: a worker that dies before it is ready
    load = engine.load()
    address, registration = start_registration(args, port, log, "prefill", fingerprint,
                                               load.num_pages, load.num_slots,
                                               token=token, tls=tls)
    freeze_startup_heap(log)
    print_ready("prefill", grpc=address, fingerprint=fingerprint,
                pages=load.num_pages, slots=load.num_slots)
    await stop.wait()
    if group is not None:
        group.stopping = True
    log.info("stopping: finishing the batch in flight")
    if registration is not None:
        registration.cancel()
    service.serving = False
    await server.stop(grace=args.drain_timeout)
    service.executor.shutdown(wait=True)
    # pushes still unacknowledged (their Prefill calls cut by the grace): every one settles within its ack timeout
    deadline = asyncio.get_running_loop().time() + args.transfer_timeout + 1
    while worker.transfers_in_flight and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
    ticking.set()
    sender.close()
    return 0

