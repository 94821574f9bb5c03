"""The router and the clients start without torch (docs/DESIGN.md §2, "Layers"): a real `sparsepd router` in
front of a real colocated worker serves a real `sparsepd generate TEXT` client, both run with Python's import
trace on (PYTHONPROFILEIMPORTTIME, the `-X importtime` of a process started as a user starts it), and neither
trace holds torch; the CLI imports only the chosen subcommand's role, and every role's parser is torch-free.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from sparsepd.deploy.launch import start, stop

ROLE_PACKAGES = ("router", "prefill_worker", "decode_worker", "loadtest", "engine", "model", "kernels")


def imported(trace: str) -> set[str]:
    """The modules an import trace (`-X importtime` lines on stderr) names."""
    return {line.rsplit("|", 1)[1].strip() for line in trace.splitlines() if line.startswith("import time:")}


def _torch_in(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if m == "torch" or m.startswith("torch."))


def _traced_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}


@pytest.fixture(scope="module")
def worker():
    child = start("colocated", ["decode-worker", "--colocated", "--preset", "tiny", "--num-slots", "4",
                                "--num-pages", "64"], timeout_s=240)
    try:
        yield child.ready["grpc"]
    finally:
        stop(child)


def _start_traced_router(worker: str, trace: Path) -> tuple[subprocess.Popen, dict]:
    """`python -m sparsepd router` with the import trace to `trace`; its READY endpoints."""
    with trace.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "sparsepd", "router", "--port", "0", "--metrics-port", "-1",
                                 "--colocated", worker], stdout=subprocess.PIPE, stderr=err, text=True,
                                env=_traced_env(), start_new_session=True)
    ready: dict = {}

    def read() -> None:
        for line in proc.stdout:
            if line.startswith("READY ") and not ready:
                ready.update(json.loads(line[len("READY "):]))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    for _ in range(1200):
        if ready or proc.poll() is not None:
            break
        reader.join(0.1)
    if not ready:
        proc.kill()
        proc.wait(10)
        pytest.fail(f"the router did not start (exit code {proc.returncode}):\n{trace.read_text()[-3000:]}")
    return proc, ready


def test_router_and_generate_client_run_without_torch(worker, tmp_path):
    trace = tmp_path / "router.stderr"
    router, ready = _start_traced_router(worker, trace)
    try:
        client = subprocess.run([sys.executable, "-m", "sparsepd", "generate", "Hello", "--router", ready["grpc"],
                                 "--max-new-tokens", "5", "--ignore-eos"], capture_output=True, text=True,
                                env=_traced_env(), timeout=180)
    finally:
        router.terminate()
        code = router.wait(60)
    assert client.returncode == 0, client.stderr[-3000:]
    assert "finish: length" in client.stderr
    assert len(json.loads(client.stderr.split("tokens: ")[1].splitlines()[0])) == 5
    assert code == 0, trace.read_text()[-3000:]

    client_modules, router_modules = imported(client.stderr), imported(trace.read_text())
    # the traces are real: each names the modules its role runs on
    assert {"sparsepd.deploy.cli", "sparsepd.router.client", "grpc"} <= client_modules
    assert {"sparsepd.router.dispatch", "sparsepd.fingerprint", "sparsepd.router.service"} <= router_modules
    assert _torch_in(client_modules) == [], "the generate client imported torch"
    assert _torch_in(router_modules) == [], "the router imported torch (through the whole request)"
    for name in ("engine", "prefill_worker", "decode_worker", "kernels"):
        assert not any(m.startswith(f"sparsepd.{name}") for m in client_modules | router_modules), name


@pytest.mark.parametrize("argv, role", [
    (["--help"], None),
    (["router", "--help"], "router"),
    (["prefill-worker", "--help"], "prefill_worker"),
    (["decode-worker", "--help"], "decode_worker"),
    (["loadtest", "--help"], "loadtest"),
    (["generate", "--help"], None),
])
def test_the_cli_imports_only_the_chosen_subcommand(argv, role):
    out = subprocess.run([sys.executable, "-m", "sparsepd", *argv], capture_output=True, text=True,
                         env=_traced_env(), timeout=120)
    assert out.returncode == 0 and "usage: sparsepd" in out.stdout, out.stderr[-3000:]
    modules = imported(out.stderr)
    assert "sparsepd.deploy.cli" in modules and _torch_in(modules) == []
    roles = {p for p in ROLE_PACKAGES for m in modules if m == f"sparsepd.{p}" or m.startswith(f"sparsepd.{p}.")}
    # a worker's flags include the engine's (engine/args.py, torch-free)
    assert roles <= ({role, "engine"} if role in ("prefill_worker", "decode_worker") else {role} - {None}), roles


def test_every_parser_builds_without_torch():
    code = ("import sys; from sparsepd.deploy.cli import build_parser; p = build_parser(); "
            "p.parse_args(['prefill-worker', '--port', '0']); p.parse_args(['serve', '--colocated']); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
