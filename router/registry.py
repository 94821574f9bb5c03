"""`WorkerRegistry`: the router's side of worker registration (served beside the public API). A worker
started with `--router` calls Register at start and every heartbeat; the pool adds it, or polls it at
once when it is known (a restarted worker is back in service without waiting for the next poll)."""

from __future__ import annotations

from sparsepd.proto import worker_pb2, worker_pb2_grpc
from sparsepd.router.workers import HEARTBEAT_S, WorkerPool


class RegistryService(worker_pb2_grpc.WorkerRegistryServicer):
    def __init__(self, pool: WorkerPool, heartbeat_s: float = HEARTBEAT_S):
        self.pool, self.heartbeat_s = pool, heartbeat_s

    async def Register(self, request, context):
        accepted, message = await self.pool.register(request)
        return worker_pb2.RegisterResponse(accepted=accepted, message=message, heartbeat_s=self.heartbeat_s)
