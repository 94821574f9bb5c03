"""`sparsepd router`: the public gRPC front end (SGLang's scheduler service) in front of prefill and decode
workers, given by address or registering themselves (workers started with `--router HOST:PORT`). Serves
grpc.health.v1, server reflection and the workers' registry beside it (registration needs the cluster token;
the public API does not), and Prometheus metrics on an HTTP port. `--tls-cert`/`--tls-key` make the public
port TLS (`--tls-client-ca`: mutual TLS); `--cluster-tls-ca` dials the workers over TLS. Prints `READY {...}`
with its endpoints once the workers given by address answer (at once when none is given: the workers
register when they are up).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from sparsepd.cluster_token import add_token_args, server_interceptors, token_from_args
from sparsepd.fingerprint import deployment_fingerprint
from sparsepd.load_flags import add_load_args
from sparsepd.process import freeze_startup_heap, print_ready, setup_logging, stop_on_signals
from sparsepd.proto import sglang_scheduler_pb2, sglang_scheduler_pb2_grpc, worker_pb2_grpc
from sparsepd.router.dispatch import Dispatcher
from sparsepd.router.malformed import MalformedRequestInterceptor
from sparsepd.router.metrics import RouterMetrics
from sparsepd.router.model_card import card_for
from sparsepd.router.registry import RegistryService
from sparsepd.router.service import SchedulerService
from sparsepd.router.timing import TimingLog
from sparsepd.router.workers import HEARTBEAT_S, WorkerPool
from sparsepd.tls import add_port, add_tls_args, tls_from_args

log = logging.getLogger("sparsepd.router")
MAX_REQUEST_BYTES = 64 << 20  # larger requests get RESOURCE_EXHAUSTED from gRPC itself
SERVICE = sglang_scheduler_pb2.DESCRIPTOR.services_by_name["SglangScheduler"].full_name


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address of the public gRPC server (default: %(default)s)")
    p.add_argument("--port", type=int, default=30000, help="public gRPC port; 0 = any free port (default: %(default)s)")
    p.add_argument("--prefill", action="append", default=[], metavar="HOST:PORT",
                   help="a prefill worker's control address (repeat for several)")
    p.add_argument("--decode", action="append", default=[], metavar="HOST:PORT",
                   help="a decode worker's control address (repeat for several)")
    p.add_argument("--colocated", action="append", default=[], metavar="HOST:PORT",
                   help="a colocated worker's address (`decode-worker --colocated`: prefill and decode in one "
                        "engine; repeat for several)")
    p.add_argument("--heartbeat", type=float, default=HEARTBEAT_S,
                   help="seconds between a registered worker's Register calls (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="the workers' random-weight seed: part of the model fingerprint they must match (default: 0)")
    add_model_arguments(p)
    add_load_args(p)  # the workers' weight options: part of the fingerprint
    add_dispatch_arguments(p)
    p.add_argument("--metrics-host", default="127.0.0.1", help="Prometheus endpoint address (default: %(default)s)")
    p.add_argument("--metrics-port", type=int, default=30090,
                   help="Prometheus endpoint port; 0 = any free port, -1 = off (default: %(default)s)")
    p.add_argument("--worker-timeout", type=float, default=60.0,
                   help="seconds to wait for every worker to answer at start (default: %(default)s)")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="on SIGTERM: seconds the requests in flight may take to finish before they are aborted "
                        "(default: %(default)s)")
    p.add_argument("--log-level", default="INFO")
    add_token_args(p)
    add_tls_args(p)


def add_model_arguments(p: argparse.ArgumentParser, preset_help: str | None = None) -> None:
    """The model flags; `preset_help` for a command whose --preset defaults to None (serve: the shipped model)."""
    g = p.add_argument_group("model")
    if preset_help is None:
        g.add_argument("--preset", default="tiny", help="model preset the workers run: tiny, bench, v4-flash, "
                                                        "v4-pro (default: tiny)")
    else:
        g.add_argument("--preset", default=None, help=preset_help)
    g.add_argument("--checkpoint", default=None, help="the workers' checkpoint directory (its config.json and "
                                                      "tokenizer files describe the model)")
    g.add_argument("--served-model-name", default=None, help="model name reported to clients (default: from the "
                                                             "preset or checkpoint)")


def add_dispatch_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("dispatch")
    g.add_argument("--max-queue", type=int, default=256,
                   help="requests admitted and not yet sent to prefill (queued, or reserving decode pages) before "
                        "new ones get RESOURCE_EXHAUSTED; a request put back for want of room keeps its place, one "
                        "moved off a lost worker may pass the cap (default: %(default)s)")
    g.add_argument("--batch-tokens", type=int, default=2048,
                   help="prompt tokens per prefill batch (default: %(default)s)")
    g.add_argument("--batch-wait-ms", type=float, default=5.0,
                   help="how long a batch waits for more requests while its prefill worker is busy with another batch "
                        "(an idle worker gets the queue at once) (default: %(default)s)")
    g.add_argument("--batch-wait-idle", action="store_true",
                   help="wait --batch-wait-ms for more requests also when the prefill worker is idle: fuller batches "
                        "at low load, at the cost of that wait in every request's time to first token")
    g.add_argument("--max-new-tokens-limit", type=int, default=None,
                   help="largest max_new_tokens a request may ask for (default: the context length)")
    g.add_argument("--max-migrations", type=int, default=3,
                   help="times a request may be moved to other workers after its worker was lost before it fails "
                        "UNAVAILABLE (default: %(default)s)")
    g.add_argument("--worker-wait", type=float, default=30.0,
                   help="seconds requests wait for a prefill or decode worker while none is alive (one may be "
                        "restarting) before they fail UNAVAILABLE (default: %(default)s)")
    g.add_argument("--forget-after", type=float, default=60.0,
                   help="seconds a registered worker may stay dead before it leaves the router's tables (one given "
                        "by address stays, polled until it answers) (default: %(default)s)")
    g.add_argument("--timing-log", default=None, metavar="FILE",
                   help="append one JSON line per request to FILE: its arrival and when each chunk and the final "
                        "response left the router (router/timing.py; to check clients' TTFT and TPOT against)")
    g.add_argument("--stream-interval", type=_positive_int, default=1, metavar="N",
                   help="tokens a streamed chunk waits for: the first token goes out at once, then one chunk per N "
                        "tokens (and the rest before the end); fewer messages cost the router less per token (SGLang's "
                        "--stream-interval) (default: %(default)s)")
    g.add_argument("--reserve-ttl", type=float, default=60.0,
                   help="seconds a decode reservation waits for its state; a decode worker's shorter "
                        "--reservation-ttl wins (default: %(default)s)")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer ≥ 1, got {value}")
    return value


async def serve(args: argparse.Namespace) -> int:
    """Run the router until SIGTERM. The workers must match the deployment's model fingerprint, computed from
    --preset/--checkpoint/--seed and the weight options as they compute it (sparsepd/fingerprint.py, torch-free)."""
    setup_logging("router", args.log_level)
    fingerprint = deployment_fingerprint(args.preset, args.checkpoint, args.seed, args.load_format, args.dtype,
                                         args.num_layers)
    token, tls = token_from_args(args), tls_from_args(args)
    card = card_for(args.preset, args.checkpoint, args.served_model_name)
    pool = WorkerPool(args.prefill, args.decode, args.colocated, fingerprint=fingerprint, token=token, tls=tls,
                      page_size=card.page_size, forget_after_s=args.forget_after, worker_wait_s=args.worker_wait)
    if not pool.all:
        log.info("no worker addresses given: waiting for workers to register (`--router HOST:PORT` on each)")
    metrics = RouterMetrics(card.served_model_name)
    dispatcher = Dispatcher(pool, card.load_tokenizer(), metrics, max_queue=args.max_queue,
                            batch_tokens=args.batch_tokens, batch_wait_s=args.batch_wait_ms / 1e3,
                            reserve_ttl_s=args.reserve_ttl, max_migrations=args.max_migrations,
                            stream_interval=args.stream_interval, batch_wait_idle=args.batch_wait_idle)
    metrics.watch(dispatcher)
    await pool.start()
    deadline = time.monotonic() + args.worker_timeout
    while not all(w.alive for w in pool.all):
        if time.monotonic() > deadline:
            down = [f"{w.role} {w.address}: {w.last_error}" for w in pool.all if not w.alive]
            log.error("workers did not answer within %.0f s: %s", args.worker_timeout, "; ".join(down))
            await pool.close()
            return 1
        await asyncio.sleep(0.2)
        await pool.poll_once()
    server_args = {k: v for k, v in vars(args).items() if isinstance(v, str | int | float | bool | list)}
    timing = TimingLog(args.timing_log) if args.timing_log else None
    service = SchedulerService(dispatcher, card, server_args, args.max_new_tokens_limit, token=token, timing=timing)
    # the token check first: an unauthenticated call is refused before its bytes are parsed
    server = grpc.aio.server(interceptors=[*server_interceptors(token), MalformedRequestInterceptor()],
                             options=[("grpc.max_send_message_length", 64 << 20),
                                      ("grpc.max_receive_message_length", MAX_REQUEST_BYTES)])
    sglang_scheduler_pb2_grpc.add_SglangSchedulerServicer_to_server(service, server)
    worker_pb2_grpc.add_WorkerRegistryServicer_to_server(RegistryService(pool, args.heartbeat), server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection((SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                                         reflection.SERVICE_NAME), server)
    port = add_port(server, f"{args.host}:{args.port}", tls)
    await server.start()
    dispatcher.start()
    metrics_port = metrics.serve(args.metrics_host, args.metrics_port) if args.metrics_port >= 0 else None
    health_task = asyncio.create_task(_track_health(service, health))
    stop = stop_on_signals(asyncio.get_running_loop())
    endpoints = {"grpc": f"{args.host}:{port}", "model": card.served_model_name, "fingerprint": fingerprint,
                 "tls": tls.serves_tls}
    if metrics_port is not None:
        endpoints["metrics"] = f"http://{args.metrics_host}:{metrics_port}/metrics"
    freeze_startup_heap(log)
    print_ready("router", **endpoints)
    await stop.wait()
    health_task.cancel()
    await _shutdown(service, dispatcher, health, server, grace_s=args.drain_timeout)
    metrics.close()
    if timing is not None:
        timing.close()
    await pool.close()
    return 0


async def _track_health(service: SchedulerService, health) -> None:
    """Keep grpc.health.v1 in step with the workers: SERVING while a prefill and a decode worker are alive."""
    last = None
    while True:
        healthy, _ = service.health()
        if healthy != last:
            status = health_pb2.HealthCheckResponse.SERVING if healthy else health_pb2.HealthCheckResponse.NOT_SERVING
            await health.set("", status)
            await health.set(SERVICE, status)
            last = healthy
        await asyncio.sleep(0.2)


async def _shutdown(service, dispatcher: Dispatcher, health, server, grace_s: float) -> None:
    """Stop taking requests, let those in flight finish for a while, abort the rest (freeing their pages)."""
    log.info("stopping: no new requests; %d in flight", len(dispatcher.flows))
    dispatcher.draining = True
    await health.enter_graceful_shutdown()
    deadline = time.monotonic() + grace_s
    while dispatcher.flows and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    dispatcher.abort_all("the router is shutting down")
    await asyncio.sleep(0.2)  # let the releases go out
    await server.stop(grace=1.0)
    await dispatcher.stop()

