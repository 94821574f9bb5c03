"""Test setup shared by the whole suite.

On a machine without a GPU the Triton kernels run in the interpreter, which Triton decides when a
kernel is decorated: the variable must be set before any kernel module is imported.

Every process a test starts inherits one cluster token (a random one per session, unless the environment
already has one), as a deployment's processes do: authentication is on throughout the suite. They run with one
torch thread each (OMP_NUM_THREADS=1, unless the environment sets it).
"""

import contextlib
import fcntl
import os
import secrets
import tempfile
import time

os.environ.setdefault("TRITON_INTERPRET", "0" if os.environ.get("SPARSEPD_TEST_GPU") == "1" else "1")
os.environ.setdefault("SPARSEPD_CLUSTER_TOKEN", f"test-{secrets.token_urlsafe(24)}")

import pytest  # noqa: E402
import torch  # noqa: E402

# The processes a test starts (workers, routers, group ranks) compute beside each other and beside the test: on a
# small machine one torch thread each is much faster than every process spinning up one per core (router tests on
# 2 cores: 84 s → 62 s; a group of 4 ranks: 28 s → 14 s). Set after torch is imported, so the test process keeps its
# own default, which it uses alone.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture
def device() -> torch.device:
    """The device kernel tests run on: CUDA when SPARSEPD_TEST_GPU=1, else the CPU interpreter."""
    return torch.device("cuda" if os.environ.get("SPARSEPD_TEST_GPU") == "1" else "cpu")


# Tests that hold many GiB of GPU memory at once (real model shapes, whole models, fp64 references of big
# weights): with many pytest processes on one GPU (scripts/test-gpu) at most a few of them run at a time
# (`_heavy_slots`).
HEAVY_PATTERNS = ("tests/gpu/", "real_shapes", "v4_flash", "bench_shapes", "fp4_gpu", "graph_replay", "test_graphs.py",
                  "gpu_bf16")
# SPARSEPD_GPU_HEAVY_SLOTS overrides; by default one slot per 20 GB of the card less one (an H100: 3, an H200: 6), ≥ 2.


def _heavy_slots() -> int:
    if os.environ.get("SPARSEPD_GPU_HEAVY_SLOTS"):
        return max(1, int(os.environ["SPARSEPD_GPU_HEAVY_SLOTS"]))
    return max(2, int(torch.cuda.get_device_properties(0).total_memory / 20e9) - 1)


@contextlib.contextmanager
def _heavy_slot(nodeid: str):
    """Holds one of `_heavy_slots()` file locks (shared by every process of the run) while a heavy GPU test runs."""
    if os.environ.get("SPARSEPD_TEST_GPU") != "1" or not any(p in nodeid for p in HEAVY_PATTERNS):
        yield
        return
    if not torch.cuda.is_available():
        yield
        return
    base = os.path.join(tempfile.gettempdir(), f"sparsepd-gpu-slot-{os.getuid()}")
    slots = _heavy_slots()
    while True:
        for i in range(slots):
            f = open(f"{base}-{i}", "w")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                f.close()
                continue
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
                f.close()
            return
        time.sleep(0.05)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    """On the GPU: heavy tests take a slot (above), and every test gives its cached GPU memory back when it ends,
    so that the other processes sharing the card can use it."""
    with _heavy_slot(item.nodeid):
        yield
        if os.environ.get("SPARSEPD_TEST_GPU") == "1" and torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()


def _uses_gpu(item: pytest.Item) -> bool:
    """Whether a test exercises the GPU when SPARSEPD_TEST_GPU=1: tests/gpu, a test that takes the `device`
    fixture, or one marked to be skipped without a GPU (its reason names the GPU or CUDA)."""
    if item.nodeid.startswith("tests/gpu/") or "device" in getattr(item, "fixturenames", ()):
        return True
    return any(w in m.kwargs.get("reason", "") for m in item.iter_markers("skipif") for w in ("GPU", "CUDA"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """With SPARSEPD_GPU_ONLY=1 (scripts/test-gpu) only the tests that exercise the GPU run: the rest are CPU
    tests that the CPU suite (CI) already runs, and on a GPU machine they only cost time."""
    if os.environ.get("SPARSEPD_GPU_ONLY") != "1":
        return
    keep = [it for it in items if _uses_gpu(it)]
    if len(keep) < len(items):
        config.hook.pytest_deselected(items=[it for it in items if not _uses_gpu(it)])
        items[:] = keep


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """With SPARSEPD_TEST_LOG=PATH, every test's outcome and seconds (and any setup or teardown of a second or
    more) are appended to PATH.<process> as they happen, and a failure's traceback and stderr to
    PATH.<process>.failures: a run cut off by a time limit (a device
    call, CI) still says what ran, how long each test took and why each failure failed."""
    path = os.environ.get("SPARSEPD_TEST_LOG")
    if not path or getattr(report, "node", None) is not None:  # pytest-xdist's controller: the worker logged it
        return
    if report.when != "call" and report.outcome == "passed" and report.duration < 1.0:
        return
    proc = os.environ.get("PYTEST_XDIST_WORKER", "main")
    with open(f"{path}.{proc}", "a") as f:
        f.write(f"{report.duration:9.3f} {report.when} {report.outcome} {report.nodeid}\n")
    if report.failed:
        captured = "".join(f"--- {name}\n{text[-3000:]}\n" for name, text in report.sections if "stderr" in name)
        with open(f"{path}.{proc}.failures", "a") as f:
            f.write(f"===== {report.nodeid} ({report.when})\n{report.longreprtext}\n{captured}")
