"""`WorkerRegistry`: the router's side of worker registration (served beside the public API). A worker
started with `--router` calls Register at start and every heartbeat; the pool adds it, or polls it at
once when it is known (a restarted worker is back in service without waiting for the next poll). Only calls
with the cluster token get here (the router's RequireClusterToken interceptor); a refusal is logged with the
caller's address."""

from __future__ import annotations

import logging

from sparsepd.proto import worker_pb2, worker_pb2_grpc
from sparsepd.router.workers import HEARTBEAT_S, WorkerPool

log = logging.getLogger("sparsepd.router")


class RegistryService(worker_pb2_grpc.WorkerRegistryServicer):
    def __init__(self, pool: WorkerPool, heartbeat_s: float = HEARTBEAT_S):
        self.pool, self.heartbeat_s = pool, heartbeat_s

    async def Register(self, request, context):
        accepted, message = await self.pool.register(request)
        if not accepted:
            log.warning("refused the registration of %s worker %s from %s: %s", request.role or "(no role)",
                        request.address or "(no address)", context.peer(), message)
        return worker_pb2.RegisterResponse(accepted=accepted, message=message, heartbeat_s=self.heartbeat_s)
