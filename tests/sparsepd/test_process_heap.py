"""sparsepd/process.py `freeze_startup_heap`: start-up objects leave the collector's full collections; what serving
allocates afterwards is collected as before."""

from __future__ import annotations

import gc
import logging
import subprocess
import sys
import weakref

from sparsepd.process import freeze_startup_heap


class _Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the collector frees it


def test_startup_objects_are_frozen_and_later_garbage_is_still_collected(caplog):
    gc.unfreeze()
    try:
        startup = [_Node() for _ in range(1000)]  # held: start-up state
        before = len(gc.get_objects())
        with caplog.at_level(logging.INFO):
            frozen = freeze_startup_heap(logging.getLogger("test"))
        assert frozen >= 1000 and gc.get_freeze_count() >= 1000  # (frozen objects freed by refcount leave it)
        assert len(gc.get_objects()) < before - 1000  # the held objects are out of the tracked generations
        assert "froze" in caplog.text
        later = _Node()  # serving's garbage: a cycle made after the freeze
        alive = weakref.ref(later)
        del later
        gc.collect()
        assert alive() is None
        assert startup[0].me is startup[0]
    finally:
        gc.unfreeze()


def test_a_frozen_process_exits_without_leak_reports():
    """The frozen objects are unfrozen at exit: the interpreter's last collection frees them, and Triton's
    bindings (nanobind) print no "leaked" report on stderr, as they did for a frozen heap at exit."""
    code = ("import logging, triton, triton.language; from sparsepd.process import freeze_startup_heap; "
            "freeze_startup_heap(logging.getLogger('t'))")
    done = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "leaked" not in done.stderr, done.stderr[-2000:]
