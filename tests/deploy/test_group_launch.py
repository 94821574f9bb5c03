"""A worker group's shape from its flags (sparsepd/group_args.py) and each rank's command (deploy/group.py): fast
checks without processes (tests/deploy/test_serve_groups.py and tests/engine/test_group.py run real ones)."""

from __future__ import annotations

import argparse

import pytest
from pydantic import ValidationError

from sparsepd.decode_worker.args import add_arguments
from sparsepd.deploy.group import rank_argv, wants_launcher
from sparsepd.group_args import GroupSpec, group_spec_from_args


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(list(argv))


def test_plain_worker_has_no_group():
    args = parse("--device", "cpu")
    assert group_spec_from_args(args) is None and not wants_launcher(args)
    with pytest.raises(ValueError, match="--ep 2 / --nnodes 1 need --devices"):
        group_spec_from_args(parse("--ep", "2"))


def test_two_hosts_ranks_and_devices():
    args = parse("--devices", "cuda:0,cuda:1", "--ep", "4", "--nnodes", "2", "--node-rank", "1",
                 "--master-addr", "host0", "--master-port", "29500", "--local-rank", "1")
    spec = group_spec_from_args(args)
    assert (spec.rank, spec.device, spec.backend, spec.ep) == (3, "cuda:1", "nccl", 4)
    assert not wants_launcher(args)  # a rank the launcher started


@pytest.mark.parametrize("flags,message", [
    (dict(devices=("cpu", "cpu"), ep=3), "must equal --nnodes 1 × the 2 devices"),
    (dict(devices=("cpu",), ep=2, nnodes=2), "needs --master-port"),
    (dict(devices=("cpu",), ep=2, nnodes=2, node_rank=2, master_port=1), "--node-rank 2 must be < --nnodes 2"),
    (dict(devices=("cpu", "cuda:0"), ep=2), "mixes device kinds"),
    (dict(devices=("cpu",), ep=1, local_rank=1), "local rank 1 is outside"),
])
def test_bad_group_flags_are_refused_naming_them(flags, message):
    with pytest.raises(ValidationError, match=message):
        GroupSpec(**flags)


def test_each_rank_gets_its_ports():
    argv = ["decode-worker", "--devices", "cpu,cpu", "--ep", "2", "--port", "50061",
            "--zmq-endpoint", "tcp://0.0.0.0:5601", "--zmq-advertise", "tcp://dhost:5601"]
    args = parse(*argv[1:])
    spec = group_spec_from_args(args)
    assert wants_launcher(args)
    cmd = rank_argv(argv, args, spec, 1, 29400)
    again = parse(*cmd[1:])  # later flags win
    assert (again.local_rank, again.master_port, again.port) == (1, 29400, 50062)
    assert (again.zmq_endpoint, again.zmq_advertise) == ("tcp://0.0.0.0:5602", "tcp://dhost:5602")
    zero = parse("--devices", "cpu,cpu", "--ep", "2")
    assert parse(*rank_argv(["decode-worker"], zero, group_spec_from_args(zero), 1, 1)[1:]).port == 0  # any
