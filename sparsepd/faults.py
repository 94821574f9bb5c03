"""Named fault points in the workers, for the reliability tests and drills: off unless SPARSEPD_FAULTS is
set (the transfer's own faults — dropped, delayed, truncated, corrupted frames, lost acks — are
SPARSEPD_TRANSFER_FAULT, `proto/transfer.py`).

    SPARSEPD_FAULTS="POINT=ACTION[,POINT=ACTION...]"   ACTION: crash[@N] | delay:SECONDS[@N]

`crash` ends the process at once (exit code 70, no cleanup: what a killed or crashed worker looks like) on the
N-th time the point is reached (default the first); `delay` sleeps there, for the first N hits (default all).
Points: prefill.step (before each engine step of a batch), prefill.push (a state exported, before it is sent),
decode.step (before each decode step), decode.admit (a shipped state arrived, before it is admitted),
prefill.start and decode.start (the worker is up, before it registers and says it is ready).
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

ENV = "SPARSEPD_FAULTS"
POINTS = ("prefill.step", "prefill.push", "decode.step", "decode.admit", "prefill.start", "decode.start")
CRASH_EXIT_CODE = 70
log = logging.getLogger("sparsepd.faults")


@dataclass(frozen=True)
class Fault:
    action: str  # "crash" or "delay"
    seconds: float = 0.0
    count: int | None = None  # crash: on this hit (1-based); delay: for this many hits (None = all)


class Faults:
    """The fault points of one process; `hit(point)` is a no-op for points without a fault."""

    def __init__(self, faults: Mapping[str, Fault] | None = None):
        self.faults = dict(faults or {})
        self.hits: Counter[str] = Counter()

    @classmethod
    def parse(cls, text: str) -> Faults:
        faults = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            m = re.fullmatch(r"([a-z.]+)=(crash|delay)(?::([0-9.]+))?(?:@([0-9]+))?", item)
            if m is None or m.group(1) not in POINTS or (m.group(2) == "delay") != (m.group(3) is not None):
                raise ValueError(f"{ENV}: {item!r}: expected POINT=crash[@N] or POINT=delay:SECONDS[@N], POINT one "
                                 f"of {list(POINTS)}")
            faults[m.group(1)] = Fault(m.group(2), float(m.group(3) or 0), int(m.group(4)) if m.group(4) else None)
        return cls(faults)

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Faults:
        faults = cls.parse(env.get(ENV, ""))
        if faults.faults:
            log.warning("fault injection is on: %s", env[ENV])
        return faults

    def hit(self, point: str) -> None:
        fault = self.faults.get(point)
        if fault is None:
            return
        self.hits[point] += 1
        n = self.hits[point]
        if fault.action == "crash" and n == (fault.count or 1):
            log.error("fault injection: crashing at %s (hit %d)", point, n)
            logging.shutdown()
            os._exit(CRASH_EXIT_CODE)
        if fault.action == "delay" and (fault.count is None or n <= fault.count):
            time.sleep(fault.seconds)
