"""Speculative decoding's options: `--speculative-num-steps` reaches the decode workers (not the prefill ones),
the engine config reads it and loads the checkpoint's MTP layer, and bad values fail with a precise message."""

from __future__ import annotations

import argparse
from collections import deque
from types import SimpleNamespace

import pytest
import torch
from prometheus_client import CollectorRegistry
from safetensors import safe_open

from sparsepd.default_model import DEFAULT_CHECKPOINT
from sparsepd.deploy.serve import add_arguments, worker_commands
from sparsepd.engine.args import add_engine_args
from sparsepd.engine.config import engine_config_from_args
from sparsepd.engine.engine import Engine
from sparsepd.engine.pools import PoolConfig
from sparsepd.model.mtp import MTP_PREFIX, random_mtp
from sparsepd.model.weights import build_model
from sparsepd.model_config import get_preset
from sparsepd.proto import worker_pb2
from sparsepd.router.sglang_metrics import SglangWorkerCollector
from sparsepd.router.workers import WorkerPool


def _serve_args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(list(argv))


def test_serve_hands_the_option_to_every_worker():
    """Decode workers draft; prefill workers run the MTP layer over the prompt and ship its state."""
    args = _serve_args("--prefill", "1", "--decode", "2", "--speculative-num-steps", "3")
    cmds = dict(worker_commands(args, [["--device", "cpu"]] * 3, "127.0.0.1:1"))
    for name in ("decode-0", "decode-1", "prefill-0"):
        cmd = cmds[name]
        assert cmd[cmd.index("--speculative-num-steps") + 1] == "3"
    plain = dict(worker_commands(_serve_args("--prefill", "1"), [["--device", "cpu"]] * 2, "127.0.0.1:1"))
    assert all("--speculative-num-steps" not in c for c in plain.values())


def _engine_args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_engine_args(p)
    return p.parse_args(list(argv))


def test_engine_config_loads_the_checkpoints_mtp_layer():
    cfg = engine_config_from_args(_engine_args("--checkpoint", str(DEFAULT_CHECKPOINT), "--speculative-num-steps", "2"))
    assert cfg.speculative_num_steps == 2
    model = cfg.build_model()
    mtp = cfg.build_mtp(model)
    with safe_open(str(DEFAULT_CHECKPOINT / "model.safetensors"), framework="pt") as f:
        assert torch.equal(mtp.e_proj.weight, f.get_tensor(MTP_PREFIX + "e_proj.weight"))
    assert engine_config_from_args(_engine_args()).speculative_num_steps == 0
    assert engine_config_from_args(_engine_args()).build_mtp(model) is None


def test_random_preset_gets_a_seeded_random_mtp_layer():
    cfg = engine_config_from_args(_engine_args("--preset", "tiny", "--speculative-num-steps", "1", "--seed", "4"))
    model = cfg.build_model()
    a, b = cfg.build_mtp(model), cfg.build_mtp(model)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert float(a.e_proj.weight.abs().sum()) > 0


def test_bad_values_are_rejected():
    with pytest.raises(ValueError, match="speculative_num_steps"):
        engine_config_from_args(_engine_args("--speculative-num-steps", "-1"))
    model = build_model(get_preset("tiny"), seed=0)
    with pytest.raises(ValueError, match="needs the checkpoint's MTP layer"):
        Engine(model, PoolConfig(num_slots=2, num_pages=8), speculative_num_steps=2)
    with pytest.raises(ValueError, match=r"must lie in \[1, 7\]"):  # k + 1 ≤ the smallest ring (8 on tiny)
        Engine(model, PoolConfig(num_slots=2, num_pages=8), speculative_num_steps=8, mtp=random_mtp(model.cfg, 1))


def test_sglang_accept_length_gauge_over_scrapes():
    """`sglang:spec_accept_length` of a speculating decode worker: (accepted drafts + verifications) / verifications
    since the previous scrape, held while nothing was verified; no series for a worker that does not speculate."""
    pool = WorkerPool(["p:1"], ["d:2"], [], page_size=16)
    for w in pool.all:
        w.alive = True
    registry = CollectorRegistry()
    registry.register(SglangWorkerCollector(SimpleNamespace(pool=pool, queue=deque(), flows={}, by_worker_id={}),
                                            "m"))
    decode = next(w for w in pool.all if w.role == "decode")

    def scrape(verifications: int, accepted: int) -> dict:
        decode.stats = worker_pb2.StatsResponse(num_pages=10, speculative=worker_pb2.SpeculativeStats(
            num_steps=3, verifications=verifications, drafted=3 * verifications, accepted=accepted))
        return {s.labels["worker"]: s.value for f in registry.collect() for s in f.samples
                if s.name == "sglang:spec_accept_length"}

    assert scrape(10, 15) == {"d:2": 2.5}
    assert scrape(30, 25) == {"d:2": 1.5}  # 10 accepted over 20 verifications since
    assert scrape(30, 25) == {"d:2": 1.5}  # nothing verified: held
