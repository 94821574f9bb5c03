"""How the host waits for a step's tokens (`gpu_wait`): "block" asks CUDA for a blocking-sync event, "spin" for the
default one, and the engine's setting reaches every copy a step waits for (the draw's and the prompt
log-probabilities'), plain and speculative. Checked on the CPU by recording what the event and the copies are asked
for."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from pydantic import ValidationError

from sparsepd.engine.config import EngineConfig
from sparsepd.engine.draw import Drawn, host_event
from sparsepd.engine.engine import Engine
from sparsepd.engine.pools import PoolConfig
from sparsepd.engine.prompt_logprobs import ScoredRows
from sparsepd.engine.sampling import SamplingParams
from sparsepd.model.mtp import random_mtp
from sparsepd.model.weights import build_model
from sparsepd.model_config import get_preset


class _Event:
    """Stands in for torch.cuda.Event: keeps the keyword arguments it was created with."""

    made: list[dict] = []

    def __init__(self, **kwargs):
        _Event.made.append(kwargs)
        self.recorded = False

    def record(self):
        self.recorded = True


class _Pinned:
    """Stands in for a pinned host tensor: takes the device copy."""

    def copy_(self, src, non_blocking=False):
        self.src = src


@pytest.mark.parametrize("gpu_wait, blocking", [("spin", False), ("block", True)])
def test_host_event_asks_for_a_blocking_event_only_when_told(monkeypatch, gpu_wait, blocking):
    _Event.made = []
    monkeypatch.setattr(torch.cuda, "Event", _Event)
    event = host_event(gpu_wait)
    assert isinstance(event, _Event)
    assert _Event.made == [{"blocking": blocking}]


@pytest.mark.parametrize("gpu_wait, blocking", [("spin", False), ("block", True), (None, False)])
def test_a_device_draw_waits_on_the_event_its_setting_asks_for(monkeypatch, gpu_wait, blocking):
    """Drawn.to_host of tokens on a CUDA device (stood in for: no CUDA here) records the event host_event makes."""
    _Event.made = []
    monkeypatch.setattr(torch.cuda, "Event", _Event)
    monkeypatch.setattr(torch, "empty", lambda *shape, **kwargs: _Pinned())
    on_device = SimpleNamespace(is_cuda=True, shape=(3,))
    drawn = Drawn(on_device, None, None, None, [False] * 3, [0] * 3)
    host = drawn.to_host() if gpu_wait is None else drawn.to_host(gpu_wait)
    assert _Event.made == [{"blocking": blocking}]
    assert isinstance(host.event, _Event) and host.event.recorded and host.tokens.src is on_device


@pytest.fixture(scope="module")
def tiny():
    return build_model(get_preset("tiny"), seed=0)


def _record(monkeypatch) -> dict[str, list[str]]:
    """What every Drawn.to_host and ScoredRows.to_host of the run is asked for (then the real copy, on the CPU)."""
    seen: dict[str, list[str]] = {"draw": [], "prompt": []}
    for cls, key in ((Drawn, "draw"), (ScoredRows, "prompt")):
        real = cls.to_host

        def to_host(self, gpu_wait="spin", _real=real, _key=key):
            seen[_key].append(gpu_wait)
            return _real(self, gpu_wait)

        monkeypatch.setattr(cls, "to_host", to_host)
    return seen


@pytest.mark.parametrize("gpu_wait, speculative", [("block", 0), ("block", 2), (None, 0)])
def test_the_engine_waits_for_every_step_as_configured(tiny, monkeypatch, gpu_wait, speculative):
    seen = _record(monkeypatch)
    kwargs = {} if gpu_wait is None else {"gpu_wait": gpu_wait}
    mtp = random_mtp(tiny.cfg, 1) if speculative else None
    engine = Engine(tiny, PoolConfig(num_slots=4, max_batch_tokens=64, num_pages=32), overlap=not speculative,
                    speculative_num_steps=speculative, mtp=mtp, **kwargs)
    torch.manual_seed(0)
    prompt = torch.randint(0, 256, (5,)).tolist()
    params = SamplingParams(max_new_tokens=3, ignore_eos=True, logprob_start_len=0)
    request = engine.submit(prompt, params)
    while engine.has_work:
        engine.step()
    assert request.finish_reason == "length" and len(request.output_ids) == 3
    assert len(request.prompt_logprobs) == len(prompt) - 1  # positions 1 …: the first token has no predecessor
    want = gpu_wait or "spin"
    assert seen["draw"] and set(seen["draw"]) == {want}
    assert seen["prompt"] and set(seen["prompt"]) == {want}
    load = engine.load()
    assert (load.free_pages, load.free_slots) == (load.num_pages, load.num_slots)


def test_engine_config_refuses_an_unknown_wait_naming_the_field():
    assert EngineConfig().gpu_wait == "spin"
    assert EngineConfig(gpu_wait="block").gpu_wait == "block"
    with pytest.raises(ValidationError) as info:
        EngineConfig(gpu_wait="sleep")
    (error,) = info.value.errors()
    assert error["loc"] == ("gpu_wait",) and "'spin' or 'block'" in error["msg"]

