"""What `sparsepd serve` hands each worker (deploy/serve.py `worker_commands`): the worker options reach the
workers that take them, and only those."""

from __future__ import annotations

import argparse

from sparsepd.deploy.serve import add_arguments, worker_commands


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(list(argv))


def _value(cmd: list[str], flag: str) -> str | None:
    return cmd[cmd.index(flag) + 1] if flag in cmd else None


def test_max_retracted_memory_reaches_decode_workers_only():
    args = _args("--prefill", "1", "--decode", "2", "--max-retracted-memory", "12345")
    cmds = dict(worker_commands(args, [["--device", "cpu"]] * 3, "127.0.0.1:1"))
    assert sorted(cmds) == ["decode-0", "decode-1", "prefill-0"]
    assert _value(cmds["decode-0"], "--max-retracted-memory") == "12345"
    assert _value(cmds["decode-1"], "--max-retracted-memory") == "12345"
    assert "--max-retracted-memory" not in cmds["prefill-0"]  # a prefill worker retracts nothing
    assert all(_value(c, "--router") == "127.0.0.1:1" for c in cmds.values())


def test_colocated_workers_get_the_cache_and_retraction_options():
    args = _args("--colocated", "--prefill", "0", "--decode", "1", "--prefix-cache-entries", "7",
                 "--max-retracted-memory", "0")
    (name, cmd), = worker_commands(args, [["--device", "cuda:0"]], "127.0.0.1:2")
    assert name == "colocated-0" and cmd[0] == "decode-worker" and "--colocated" in cmd
    assert _value(cmd, "--prefix-cache-entries") == "7" and _value(cmd, "--max-retracted-memory") == "0"
    assert _value(cmd, "--device") == "cuda:0"


def test_without_the_option_the_workers_keep_their_default():
    args = _args("--prefill", "1", "--decode", "1")
    commands = worker_commands(args, [["--device", "cpu"]] * 2, "h:1")
    assert all("--max-retracted-memory" not in cmd for _, cmd in commands)
