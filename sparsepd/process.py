"""What every sparsepd process does the same way: log setup, the ready line, stopping on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys


def setup_logging(role: str, level: str = "INFO") -> None:
    """One line per record: `TIME ROLE LEVEL LOGGER: MESSAGE [request_id=ID]` — every line about a request ends
    with its id (log it with `extra={"request_id": ...}` or through `request_logger`), so grep finds its path
    through router and workers."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_request_id_suffix)
    handler.setFormatter(logging.Formatter(f"%(asctime)s {role} %(levelname)s %(name)s: %(message)s%(rid)s"))
    logging.basicConfig(level=level, handlers=[handler])


def _request_id_suffix(record: logging.LogRecord) -> bool:
    rid = getattr(record, "request_id", None)
    record.rid = f" request_id={rid}" if rid else ""
    return True


def request_logger(logger: logging.Logger, request_id: str) -> logging.LoggerAdapter:
    """A logger whose every line carries `request_id=...`."""
    return logging.LoggerAdapter(logger, {"request_id": request_id})


def print_ready(role: str, **endpoints: object) -> None:
    """One line on stdout that launchers wait for: `READY {"role": ..., <endpoints>}`."""
    print("READY " + json.dumps({"role": role, **endpoints}), flush=True)


def stop_on_signals(loop: asyncio.AbstractEventLoop) -> asyncio.Event:
    """An event set by SIGTERM or SIGINT (the handlers only set it)."""
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop
