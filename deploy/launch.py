"""Start sparsepd processes and wait for their ready line; stop them by pid (terminate, wait, kill).

Used by `sparsepd serve` and by the tests: a child that dies while starting is reported with its exit
code and last log lines, and the caller stops the others.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field


class LaunchError(RuntimeError):
    """A child process did not become ready: `reason` says what happened, `last_lines` are its last log lines."""

    def __init__(self, reason: str, last_lines: str = ""):
        super().__init__(f"{reason}; last lines:\n{last_lines}" if last_lines else reason)
        self.reason, self.last_lines = reason, last_lines


@dataclass
class Child:
    name: str
    proc: subprocess.Popen
    ready: dict = field(default_factory=dict)
    log_tail: deque = field(default_factory=lambda: deque(maxlen=40))
    stderr_closed: threading.Event = field(default_factory=threading.Event)  # its stderr is read to the end

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None


def start(name: str, args: list[str], timeout_s: float = 120.0, env: dict | None = None,
          echo_stderr: bool = False, on_spawn: Callable[[Child], None] | None = None) -> Child:
    """Run `python -P -m sparsepd ARGS` (-P: a checkout in the working directory must not shadow the installed
    package), wait for its `READY {...}` line, return the child with the endpoints (on_spawn gets the child as
    soon as its process exists, before it is ready)."""
    proc = subprocess.Popen([sys.executable, "-P", "-m", "sparsepd", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})},
                            start_new_session=True)
    child = Child(name, proc)
    if on_spawn is not None:
        on_spawn(child)

    def pump_stderr() -> None:
        for line in proc.stderr:
            child.log_tail.append(line.rstrip())
            if echo_stderr:
                print(f"[{name}] {line}", end="", file=sys.stderr)
        child.stderr_closed.set()

    threading.Thread(target=pump_stderr, daemon=True).start()
    deadline = time.monotonic() + timeout_s
    ready = threading.Event()

    def pump_stdout() -> None:
        for line in proc.stdout:
            if line.startswith("READY ") and not ready.is_set():
                child.ready = json.loads(line[len("READY "):])
                ready.set()
            else:
                child.log_tail.append(line.rstrip())

    threading.Thread(target=pump_stdout, daemon=True).start()
    while not ready.wait(0.1):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(child)
            reason = f"exited with code {proc.returncode}" if proc.returncode is not None else "timed out"
            raise LaunchError(f"{name} {reason} before it was ready", "\n".join(list(child.log_tail)[-15:]))
    return child


def stop(child: Child, timeout_s: float = 10.0) -> int | None:
    """SIGTERM, wait, then SIGKILL; returns the exit code."""
    if child.proc.poll() is None:
        child.proc.terminate()
        try:
            child.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            child.proc.kill()
            child.proc.wait(5)
    return child.proc.returncode
