"""A colocated worker resumes a moved request (`DecodeWorker.start_local(..., output_ids)`): it prefills prompt +
the tokens already generated in its own engine and streams exactly the tokens the undisturbed run drew next
(greedy and seeded); the slot and pages come back."""

from __future__ import annotations

import threading
import time

import pytest

from sparsepd.decode_worker.worker import DecodeWorker, TokenUpdate
from sparsepd.engine.engine import Engine
from sparsepd.engine.generate import generate
from sparsepd.engine.pools import PoolConfig
from sparsepd.engine.sampling import SamplingParams
from sparsepd.model.weights import build_model
from sparsepd.model_config import get_preset


@pytest.mark.parametrize("params", [SamplingParams(max_new_tokens=10, ignore_eos=True),
                                    SamplingParams(max_new_tokens=10, temperature=1.0, seed=9, presence_penalty=0.5,
                                                   ignore_eos=True)])
def test_colocated_start_local_resumes_after_the_tokens_so_far(params):
    model = build_model(get_preset("tiny"), seed=0)
    prompt = [256, *range(60, 83)]
    full = generate(model, prompt, params).output_ids
    worker = DecodeWorker(Engine(model, PoolConfig(num_slots=2, max_batch_tokens=16, num_pages=8)))
    streamed, finished = [], threading.Event()

    def listen(step, updates):
        for u in updates:  # the engine's StepOutputs (a TokenUpdate only for the worker's own events)
            streamed.extend(u.token_ids if isinstance(u, TokenUpdate) else [u.token])
            if u.finish_reason:
                finished.set()

    worker.listeners.append(listen)
    loop = threading.Thread(target=worker.run, daemon=True)
    loop.start()
    try:
        res = worker.reserve("moved", len(prompt), params, ttl_s=30)
        with pytest.raises(ValueError, match="fewer than max_new_tokens"):
            worker.start_local("moved", res.transfer_id, prompt, output_ids=full)
        worker.start_local("moved", res.transfer_id, prompt, output_ids=full[:4])
        assert finished.wait(120)
    finally:
        worker.stop_event.set()
        loop.join(10)
    assert full[:4] + streamed == full
    deadline = time.monotonic() + 5
    while not worker.is_empty():
        assert time.monotonic() < deadline
        time.sleep(0.05)
