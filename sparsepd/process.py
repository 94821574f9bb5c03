"""What every sparsepd process does the same way: log setup, the ready line, stopping on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys


def setup_logging(role: str, level: str = "INFO") -> None:
    logging.basicConfig(level=level, stream=sys.stderr,
                        format=f"%(asctime)s {role} %(levelname)s %(name)s: %(message)s")


def print_ready(role: str, **endpoints: object) -> None:
    """One line on stdout that launchers wait for: `READY {"role": ..., <endpoints>}`."""
    print("READY " + json.dumps({"role": role, **endpoints}), flush=True)


def stop_on_signals(loop: asyncio.AbstractEventLoop) -> asyncio.Event:
    """An event set by SIGTERM or SIGINT (the handlers only set it)."""
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop
