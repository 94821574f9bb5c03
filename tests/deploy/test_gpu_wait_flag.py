"""`--gpu-wait {spin,block}` on every command that runs an engine: it parses, reaches the engine's configuration and
the Engine each command builds (decode worker, prefill worker, `generate --local`), `serve` hands it to every worker
through their command lines, and an unknown value is refused naming the flag and the choices."""

from __future__ import annotations

import asyncio

import pytest

from sparsepd.deploy.cli import build_parser, main
from sparsepd.deploy.serve import worker_commands
from sparsepd.engine.config import engine_config_from_args

WORKERS = ["decode-worker", "prefill-worker"]


class _Built(Exception):
    """Raised in place of building the Engine: carries the keyword arguments it was given."""

    def __init__(self, kwargs: dict):
        super().__init__("engine built")
        self.kwargs = kwargs


def _parse(*argv: str):
    return build_parser(list(argv)).parse_args(list(argv))


def _engine_kwargs(monkeypatch, module, run) -> dict:
    """The keyword arguments `run()` builds `module.Engine` with (stopped there)."""
    def engine(model, *args, **kwargs):
        raise _Built(kwargs)

    monkeypatch.setattr(module, "Engine", engine)
    with pytest.raises(_Built) as built:
        run()
    return built.value.kwargs


@pytest.mark.parametrize("command", WORKERS)
@pytest.mark.parametrize("flags, want", [((), "spin"), (("--gpu-wait", "block"), "block"),
                                         (("--gpu-wait", "spin"), "spin")])
def test_worker_flag_reaches_the_engine_config(command, flags, want):
    assert engine_config_from_args(_parse(command, *flags)).gpu_wait == want


@pytest.mark.parametrize("command", [*WORKERS, "serve", "generate"])
def test_an_unknown_value_is_refused_naming_the_choices(command, capsys):
    with pytest.raises(SystemExit) as exited:
        _parse(command, "--gpu-wait", "sleep")
    assert exited.value.code == 2
    assert "argument --gpu-wait: invalid choice: 'sleep' (choose from 'spin', 'block')" in capsys.readouterr().err


@pytest.mark.parametrize("module_name", ["sparsepd.decode_worker.main", "sparsepd.prefill_worker.main"])
@pytest.mark.parametrize("gpu_wait", ["block", "spin"])
def test_each_worker_builds_its_engine_with_the_setting(monkeypatch, module_name, gpu_wait):
    import importlib

    module = importlib.import_module(module_name)
    command = "decode-worker" if "decode" in module_name else "prefill-worker"
    args = _parse(command, "--gpu-wait", gpu_wait, "--no-cluster-auth", "--preset", "tiny", "--num-pages", "16",
                  "--num-slots", "2", "--no-cuda-graph", "--log-level", "WARNING")
    monkeypatch.setattr(module, "setup_logging", lambda *a, **k: None)  # leave the test run's logging alone
    kwargs = _engine_kwargs(monkeypatch, module, lambda: asyncio.run(module.serve(args)))
    assert kwargs["gpu_wait"] == gpu_wait


@pytest.mark.parametrize("gpu_wait", ["block", None])
def test_generate_local_builds_its_engine_with_the_setting(monkeypatch, gpu_wait):
    from sparsepd.engine import engine as engine_module

    flags = ["--gpu-wait", gpu_wait] if gpu_wait else []
    argv = ["generate", "--local", "--prompt", "ab", "--max-new-tokens", "2", *flags]
    kwargs = _engine_kwargs(monkeypatch, engine_module, lambda: main(argv))
    assert kwargs["gpu_wait"] == (gpu_wait or "spin")


@pytest.mark.parametrize("colocated", [False, True])
def test_serve_hands_the_setting_to_every_worker_and_it_parses_there(colocated):
    shape = ["--colocated", "--prefill", "0", "--decode", "2"] if colocated else ["--prefill", "2", "--decode", "1"]
    args = _parse("serve", "--preset", "tiny", *shape, "--gpu-wait", "block")
    commands = worker_commands(args, [["--device", "cpu"]] * 3, "127.0.0.1:1")
    want = ["colocated-0", "colocated-1"] if colocated else ["decode-0", "prefill-0", "prefill-1"]
    assert [name for name, _ in commands] == want
    for _, cmd in commands:
        assert cmd[cmd.index("--gpu-wait") + 1] == "block"
        assert engine_config_from_args(_parse(*cmd)).gpu_wait == "block"  # the worker's own parser reads it


def test_serve_without_the_flag_leaves_the_workers_default():
    args = _parse("serve", "--preset", "tiny", "--prefill", "1", "--decode", "1")
    assert args.gpu_wait is None
    for _, cmd in worker_commands(args, [["--device", "cpu"]] * 2, "127.0.0.1:1"):
        assert "--gpu-wait" not in cmd
        assert engine_config_from_args(_parse(*cmd)).gpu_wait == "spin"
