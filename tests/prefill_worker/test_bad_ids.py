"""A request id or ticket transfer id the transfer header cannot carry is refused when the batch arrives
(INVALID_ARGUMENT for that request alone), not when its state is about to leave: its batch-mates are prefilled and
shipped, and the engine holds nothing after."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).parent))
from held_sender import BOUND_S, make_batch, make_service  # noqa: E402

from sparsepd.proto.transfer import Ack  # noqa: E402


def test_ids_the_header_cannot_carry_are_refused_alone(tiny):
    service, worker, sender, engine = make_service(tiny)
    batch = make_batch("good", "bad-ticket", "x" * 300)
    batch.requests[1].ticket.transfer_id = "no spaces allowed"

    async def scenario():
        call = asyncio.create_task(service.Prefill(batch, None))
        rid, tid, future = await sender.next_push()
        future.set_result(Ack(transfer_id=tid, ok=True))
        return rid, await asyncio.wait_for(call, BOUND_S)

    try:
        pushed, got = asyncio.run(scenario())
    finally:
        sender.fail_the_rest()
        service.executor.shutdown(wait=True)
    assert pushed == "good" and sender.pushed.empty()
    good, bad_ticket, long_id = got.results
    assert (good.request_id, good.ok) == ("good", True)
    invalid = grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert not bad_ticket.ok and bad_ticket.error_code == invalid and "ticket.transfer_id" in bad_ticket.error
    assert not long_id.ok and long_id.error_code == invalid and "300 characters" in long_id.error
    assert worker.transfers_in_flight == 0 and not worker.batches and engine.holds_nothing()
