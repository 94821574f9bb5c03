"""Workers started with `--router HOST:PORT` announce themselves to the router (docs/DESIGN.md §5: each worker
registers its endpoints and capacity at start) and keep doing so every heartbeat, so a router that
restarts, or one that had marked the worker dead, learns of it again without anyone re-listing addresses.
"""

from __future__ import annotations

import argparse
import asyncio
import logging

import grpc

from sparsepd.cluster_token import AuthorizedStub
from sparsepd.proto import worker_pb2, worker_pb2_grpc
from sparsepd.tls import TlsConfig, cluster_channel

DEFAULT_HEARTBEAT_S = 5.0


def add_registration_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("registration (multi-host deployments)")
    g.add_argument("--router", default=None, metavar="HOST:PORT",
                   help="register with the router at this gRPC address at start and every few seconds after")
    g.add_argument("--advertise", default=None, metavar="HOST:PORT",
                   help="the control address the router should dial (default: --host and the bound port; required "
                        "when --host is 0.0.0.0)")


def start_registration(args: argparse.Namespace, port: int, log: logging.Logger, role: str, fingerprint: str,
                       num_pages: int, num_slots: int, endpoint: str = "", token: str | None = None,
                       tls: TlsConfig | None = None) -> tuple[str, asyncio.Task | None]:
    """The worker's control address as others should dial it, and with --router the task that keeps it
    registered (cancel it at shutdown); each Register carries the cluster token, over TLS with --cluster-tls-ca."""
    if not args.router:
        return args.advertise or f"{args.host}:{port}", None
    address = advertised_address(args, port)
    request = worker_pb2.RegisterRequest(role=role, address=address, fingerprint=fingerprint, num_pages=num_pages,
                                         num_slots=num_slots, endpoint=endpoint)
    return address, asyncio.create_task(register_forever(args.router, request, log, token, tls or TlsConfig()))


def advertised_address(args: argparse.Namespace, port: int) -> str:
    if args.advertise:
        return args.advertise
    if args.host in ("0.0.0.0", "::", ""):
        raise ValueError(f"--host {args.host!r} listens everywhere: give --advertise HOST:PORT, the address the "
                         "router can reach this worker at")
    return f"{args.host}:{port}"


async def register_forever(router: str, request: worker_pb2.RegisterRequest, log: logging.Logger,
                           token: str | None = None, tls: TlsConfig | None = None, timeout_s: float = 5.0) -> None:
    """Register now and every heartbeat until cancelled; log when the router accepts, refuses, or is away."""
    state, heartbeat = None, DEFAULT_HEARTBEAT_S
    async with cluster_channel(router, tls or TlsConfig()) as channel:
        stub = AuthorizedStub(worker_pb2_grpc.WorkerRegistryStub(channel), token)
        while True:
            try:
                reply = await stub.Register(request, timeout=timeout_s)
                heartbeat = reply.heartbeat_s or DEFAULT_HEARTBEAT_S
                now = ("accepted", "") if reply.accepted else ("refused", reply.message)
            except grpc.aio.AioRpcError as exc:  # UNAUTHENTICATED: the router heard us and said no (the token)
                refused = exc.code() == grpc.StatusCode.UNAUTHENTICATED
                now = ("refused" if refused else "unreachable", f"{exc.code().name}: {exc.details()}")
            if now != state:
                if now[0] == "accepted":
                    log.info("registered with the router at %s as %s worker %s", router, request.role, request.address)
                else:
                    log.warning("the router at %s %s this worker: %s", router,
                                "refused" if now[0] == "refused" else "cannot be reached by", now[1])
                state = now
            await asyncio.sleep(heartbeat)
