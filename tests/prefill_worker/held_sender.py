"""What the prefill worker's tests drive: a real engine behind `PrefillService`, and a sender whose acks the test
gives (`HeldSender`), so that no test depends on timing."""

from __future__ import annotations

import asyncio
import queue
from concurrent.futures import Future

from sparsepd.engine.engine import Engine
from sparsepd.engine.pools import PoolConfig
from sparsepd.prefill_worker.service import PrefillService
from sparsepd.prefill_worker.worker import PrefillWorker
from sparsepd.proto import worker_pb2
from sparsepd.proto.transfer import TransferTimeout

BOUND_S = 60  # reached only when a batch waits for a held ack (it would wait forever)
FINGERPRINT = "0123abcd"


class HeldSender:
    """A TransferSender whose acks the test gives: each push is (request id, transfer id, its future), in order."""

    def __init__(self):
        self.pushed: queue.Queue = queue.Queue()
        self.futures: list[Future] = []

    def send(self, endpoint, header, tensors) -> Future:
        future: Future = Future()
        future.set_running_or_notify_cancel()
        self.futures.append(future)
        self.pushed.put((header.request_id, header.transfer_id, future))
        return future

    def fail_the_rest(self) -> None:
        """Settle what the test left held (a failing test: so that no thread waits on them for ever)."""
        for future in self.futures:
            if not future.done():
                future.set_exception(TransferTimeout("the test ended"))

    async def next_push(self):
        return await asyncio.to_thread(self.pushed.get, True, BOUND_S)  # queue.Empty: no push came


def make_batch(*rids: str) -> worker_pb2.PrefillBatch:
    sampling = worker_pb2.SamplingParams(max_new_tokens=8, ignore_eos=True)
    return worker_pb2.PrefillBatch(requests=[
        worker_pb2.PrefillRequest(request_id=rid, input_ids=[256, *range(30 + 3 * i, 60 + 3 * i)], sampling=sampling,
                                  ticket=worker_pb2.Ticket(transfer_id=f"t-{rid}", endpoint="tcp://127.0.0.1:9",
                                                           fingerprint=FINGERPRINT))
        for i, rid in enumerate(rids)])


def make_service(tiny) -> tuple[PrefillService, PrefillWorker, HeldSender, Engine]:
    engine = Engine(tiny, PoolConfig(num_slots=4, max_batch_tokens=64, num_pages=32))
    sender = HeldSender()
    worker = PrefillWorker(engine, sender, FINGERPRINT)
    return PrefillService(worker), worker, sender, engine
