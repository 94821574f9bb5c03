"""The decode worker's control calls do not wait for the device: the loop holds the engine lock over a step, but the
engine lets go of it while the forward runs and while the host waits for the tokens (`Engine.step(lock)`), so a
Reserve, a Release of a reservation and Stats are answered while a step's forward is in progress; what they see is
whole (pages held = the running request's + the reservations', disjoint), and the pools come back to full.

No timing: the step's forward is held by an event the test controls, and each control call must be answered while
it is held (a generous bound, only reached when the call waits for the step: then the test fails)."""

from __future__ import annotations

import threading

import pytest
import torch

from sparsepd.decode_worker.worker import DecodeWorker, TokenUpdate
from sparsepd.engine.drafter import OracleDrafter
from sparsepd.engine.engine import Engine
from sparsepd.engine.generate import generate
from sparsepd.engine.pools import PoolConfig
from sparsepd.engine.sampling import SamplingParams
from sparsepd.model.weights import build_model
from sparsepd.model_config import get_preset

PARAMS = SamplingParams(max_new_tokens=6, ignore_eos=True)
BOUND_S = 60  # reached only when a call waits for the held forward (it would wait forever)


@pytest.fixture(scope="module")
def tiny():
    return build_model(get_preset("tiny"), seed=0)


class HeldForward:
    """The runner's forward, held at its first call until `go` is set (the calls after it run at once)."""

    def __init__(self, engine: Engine):
        self.forward, self.entered, self.go = engine.runner.forward, threading.Event(), threading.Event()
        engine.runner.forward = self

    def __call__(self, *args, **kwargs):
        self.entered.set()
        assert self.go.wait(BOUND_S), "the held forward was never let go"
        return self.forward(*args, **kwargs)


def _answered(call, *args):
    """Run call(*args) on another thread (a control server's); its result, or an AssertionError when it did not come
    back within the bound."""
    out, done = [], threading.Event()
    threading.Thread(target=lambda: (out.append(call(*args)), done.set()), daemon=True).start()
    assert done.wait(BOUND_S), f"{call.__name__} waited for the step in progress"
    return out[0]


def test_reserve_release_and_stats_are_answered_while_a_step_computes(tiny):
    prompt = [256, *range(40, 61)]
    want = generate(tiny, prompt, PARAMS).output_ids
    engine = Engine(tiny, PoolConfig(num_slots=4, max_batch_tokens=32, num_pages=24))
    worker = DecodeWorker(engine)
    held = HeldForward(engine)
    tokens: dict[str, list[int]] = {}
    finished = {rid: threading.Event() for rid in ("a", "c")}

    def listen(step, updates):
        for u in updates:
            tokens.setdefault(u.request_id, []).extend(u.token_ids if isinstance(u, TokenUpdate) else [u.token])
            if u.finish_reason:
                finished[u.request_id].set()

    worker.listeners.append(listen)
    loop = threading.Thread(target=worker.run, daemon=True)
    loop.start()
    try:
        a = worker.reserve("a", len(prompt), PARAMS, ttl_s=60)
        worker.start_local("a", a.transfer_id, prompt)  # colocated: "a" prefills in the loop's next step
        assert held.entered.wait(BOUND_S)  # that step's forward is running (held) and holds a's pages
        b = _answered(worker.reserve, "b", 40, PARAMS, 60.0)
        assert worker.step_count == 0 and not held.go.is_set()  # answered inside the first step
        assert b.request.slot != a.request.slot and not set(b.request.pages) & set(a.request.pages)
        stats = _answered(worker.stats)
        held_pages = len(a.request.pages) + len(b.request.pages)
        assert (stats["num_pages"] - stats["free_pages"], stats["free_slots"]) == (held_pages, 2)
        assert stats["waiting"] == 1  # b: reserved, no state yet
        assert _answered(worker.release, "b") is True
        c = _answered(worker.reserve, "c", len(prompt), PARAMS, 60.0)
        _answered(worker.start_local, "c", c.transfer_id, prompt)  # queued to the loop: admitted after this step
        assert worker.step_count == 0
        held.go.set()
        assert finished["a"].wait(BOUND_S) and finished["c"].wait(BOUND_S)
    finally:
        held.go.set()
        worker.stop_event.set()
        loop.join(10)
    assert tokens == {"a": want, "c": want}
    assert worker.is_empty() and not worker.reservations


def _oracle(model, prompts):
    refs = {f"r{i}": generate(model, p, PARAMS).output_ids for i, p in enumerate(prompts)}
    return OracleDrafter(refs, 0.7, model.cfg.vocab_size, seed=1), refs


@pytest.mark.parametrize("mode", ["plain", "overlap", "speculative"])
def test_engine_step_lets_go_of_the_lock_only_while_the_device_computes(tiny, mode):
    """`Engine.step(lock)`: the forward (and the speculative drafts) run with the caller's lock free, the step's
    bookkeeping with it held; the step returns with it held, and the tokens are those of steps without a lock."""
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (5, 17, 33)]
    drafter, refs = _oracle(tiny, prompts) if mode == "speculative" else (None, None)
    engine = Engine(tiny, PoolConfig(num_slots=4, max_batch_tokens=24, num_pages=32), overlap=mode == "overlap",
                    speculative_num_steps=3 if drafter else 0, drafter=drafter)
    lock = threading.Lock()
    seen: list[tuple[str, bool]] = []
    forward, allocate = engine.runner.forward, engine.pools.pages.allocate

    def watched_forward(*args, **kwargs):
        seen.append(("forward", lock.locked()))
        return forward(*args, **kwargs)

    def watched_allocate(n):
        seen.append(("allocate", lock.locked()))
        return allocate(n)

    engine.runner.forward, engine.pools.pages.allocate = watched_forward, watched_allocate
    if drafter is not None:
        draft = drafter.draft
        drafter.draft = lambda *args: (seen.append(("draft", lock.locked())), draft(*args))[1]
    requests = [engine.submit(p, PARAMS, f"r{i}") for i, p in enumerate(prompts)]
    while engine.has_work:
        with lock:
            engine.step(lock)
            assert lock.locked()
    kinds = {kind for kind, _ in seen}
    assert {"forward", "allocate"} <= kinds and ("draft" in kinds) == (mode == "speculative")
    assert all(locked == (kind == "allocate") for kind, locked in seen), seen
    want = refs or {f"r{i}": generate(tiny, p, PARAMS).output_ids for i, p in enumerate(prompts)}
    assert {r.request_id: r.output_ids for r in requests} == want
    assert engine.is_idle_and_empty()
