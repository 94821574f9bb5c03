"""Start a worker group's ranks on this host and keep them together (`sparsepd decode-worker --devices
cuda:0,cuda:1 --ep 2 ...`, the same for prefill-worker; docs/DESIGN.md §9).

The worker command with `--devices` becomes this launcher: it starts one process per device — the same
command with `--local-rank I` (and the group's meeting port, and the control and transfer ports moved up by I
when they are fixed) — waits for every rank's ready line, prints one of its own (rank 0's endpoints, and every
rank's under "ranks"), and then watches: when one rank exits the launcher stops the others at once (SIGTERM,
then SIGKILL after a few seconds: a broken group cannot drain) and exits non-zero, naming it in its last line,
so that its supervisor (`sparsepd serve`) starts the group again. SIGTERM/SIGINT are passed to every rank (each
drains as a worker does) and the launcher exits 0 when they all did. A rank whose launcher disappears exits too
(engine/group.py watches its parent), so nothing is left behind.
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys
import threading
import time

from sparsepd.deploy.launch import Child, LaunchError, start, stop
from sparsepd.group_args import GroupSpec, group_spec_from_args
from sparsepd.process import print_ready

BROKEN_STOP_S = 3.0  # a rank's siblings get this long after SIGTERM once the group is broken
STDERR_DRAIN_S = 2.0  # how long a dead rank's last lines may take to come through its pipe


def wants_launcher(args: argparse.Namespace) -> bool:
    """Whether this worker command starts a group (--devices given, and not a rank it started)."""
    return getattr(args, "devices", None) is not None and hasattr(args, "local_rank") and args.local_rank is None


def rank_argv(argv: list[str], args: argparse.Namespace, spec: GroupSpec, local_rank: int,
              master_port: int) -> list[str]:
    """The command of one rank: the launcher's own, with its rank, the meeting port, and its own ports (later
    flags win in argparse)."""
    extra = ["--local-rank", str(local_rank), "--master-port", str(master_port)]
    if args.port:
        extra += ["--port", str(args.port + local_rank)]
    for flag in ("zmq_endpoint", "zmq_advertise"):
        endpoint = getattr(args, flag, None)
        if endpoint:
            extra += [f"--{flag.replace('_', '-')}", _shift_endpoint(endpoint, local_rank)]
    return [*argv, *extra]


def _shift_endpoint(endpoint: str, offset: int) -> str:
    """tcp://HOST:PORT → PORT + offset (0 stays 0: any); ipc://PATH → PATH-rankN."""
    if endpoint.startswith("ipc://"):
        return f"{endpoint}-rank{offset}" if offset else endpoint
    head, _, port = endpoint.rpartition(":")
    return endpoint if port in ("0", "*") or not port.isdigit() else f"{head}:{int(port) + offset}"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def launch_group(args: argparse.Namespace, argv: list[str]) -> int:
    """Run this host's ranks until one exits or a signal comes (module docstring); the exit code."""
    spec = group_spec_from_args(args)
    role = argv[0]  # the subcommand: decode-worker or prefill-worker
    master_port = spec.master_port or free_port(spec.master_addr)
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    ranks: list[Child | None] = [None] * len(spec.devices)
    spawned: list[Child] = []
    errors: list[BaseException] = []

    def start_rank(i: int) -> None:
        name = f"{role}-rank{spec.node_rank * len(spec.devices) + i}"
        try:
            ranks[i] = start(name, rank_argv(argv, args, spec, i, master_port), timeout_s=spec.timeout_s,
                             echo_stderr=True, on_spawn=spawned.append)
        except LaunchError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start_rank, args=(i,), daemon=True) for i in range(len(spec.devices))]
    for t in threads:  # at once: every rank waits in the group's rendezvous for the others
        t.start()
    while any(t.is_alive() for t in threads):
        if errors or stopping.is_set() or any(not c.alive() for c in list(spawned)):
            break
        time.sleep(0.1)
    if errors or stopping.is_set() or any(not c.alive() for c in list(spawned)):
        _stop_all(list(spawned), BROKEN_STOP_S)
        if errors:
            print(f"error: {errors[0]}", file=sys.stderr, flush=True)
        return 0 if stopping.is_set() and not errors else 1
    first = {k: v for k, v in ranks[0].ready.items() if k != "role"}
    print_ready(ranks[0].ready["role"], **first, ranks=[c.ready for c in ranks], pids=[c.pid for c in ranks])
    return _watch(ranks, stopping)


def _watch(ranks: list[Child], stopping: threading.Event) -> int:
    while not stopping.wait(0.2):
        dead = next((c for c in ranks if not c.alive()), None)
        if dead is not None:
            # its last words first (echoed as they come), then why the group stops: the launcher's last line,
            # the one a supervisor shows at the end of the lines it quotes
            dead.stderr_closed.wait(STDERR_DRAIN_S)
            why = f"{dead.name} (pid {dead.pid}) exited with code {dead.proc.returncode}"
            print(f"error: {why}; stopping the group", file=sys.stderr, flush=True)
            _stop_all([c for c in ranks if c is not dead], BROKEN_STOP_S)
            print(f"error: the group stopped: {why}", file=sys.stderr, flush=True)
            return 1
    codes = _stop_all(ranks, 60.0)
    return 0 if all(code == 0 for code in codes) else 1


def _stop_all(children: list[Child], timeout_s: float) -> list[int | None]:
    """SIGTERM every rank at once, then wait for each (SIGKILL past timeout_s)."""
    for c in children:
        if c.alive():
            c.proc.terminate()
    return [stop(c, timeout_s) for c in children]


def ready_ranks(ready: dict) -> list[dict]:
    """The ready lines of a worker's ranks (one for a plain worker)."""
    return ready.get("ranks") or [ready]


__all__ = ["launch_group", "rank_argv", "ready_ranks", "wants_launcher"]
