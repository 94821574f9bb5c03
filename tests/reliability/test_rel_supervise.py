"""`sparsepd serve` supervises its processes (deploy/supervisor.py):

- the policy on stand-in processes: a child that exits is started again after a doubling backoff, each
  restart counted; one that dies more than max_restarts times within the window is given up on, naming it;
- a real deployment: a SIGKILLed decode worker is restarted and registers again (the dead one leaves the
  router's tables after --forget-after), a SIGKILLed router comes back on the same port and the workers
  find it again; requests are served with the reference tokens after each; the restarts are in serve's
  metrics; SIGTERM still stops everything with exit code 0;
- a worker that dies at start every time makes serve give up with a message naming it and exit 1, leaving
  no process behind.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from rel_helpers import channel, generate_request, outcome_of, reference, run, stub_of, wait_all_free  # noqa: E402

from sparsepd.deploy.launch import Child, LaunchError, start, stop  # noqa: E402
from sparsepd.deploy.supervisor import RestartPolicy, Supervisor  # noqa: E402
from sparsepd.proto import sglang_scheduler_pb2 as pb  # noqa: E402


def _sleeper(name: str):
    def launch(on_spawn) -> Child:
        child = Child(name, subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"]))
        on_spawn(child)
        return child
    return launch


def test_policy_restarts_with_backoff_and_gives_up_naming_the_child():
    assert [RestartPolicy(backoff_s=0.5, max_backoff_s=3).delay_s(n) for n in (1, 2, 3, 4, 5)] == [0.5, 1, 2, 3, 3]
    said: list[str] = []

    async def main():
        sup = Supervisor(RestartPolicy(max_restarts=2, window_s=60, backoff_s=0.05), said.append)
        first = await sup.start("steady", _sleeper("steady"))
        calls = []

        def flaky(on_spawn):
            calls.append(time.monotonic())
            if len(calls) > 1:  # up once, then dies at every start
                raise LaunchError("flaky exited with code 70 before it was ready", "boom")
            return _sleeper("flaky")(on_spawn)

        await sup.start("flaky", flaky)
        stop_event = asyncio.Event()
        watching = asyncio.ensure_future(sup.watch(stop_event, poll_s=0.05))
        first.proc.kill()  # restarted
        deadline = time.monotonic() + 10
        while sup.find("steady").child is first or not sup.find("steady").child.alive():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        sup.find("flaky").child.proc.kill()  # restarted, dies at start twice more: given up
        code = await asyncio.wait_for(watching, 10)
        restarts = {k: sup.registry.get_sample_value("sparsepd_serve_restarts_total", {"child": k})
                    for k in ("steady", "flaky")}
        steady = sup.find("steady").child
        sup.stop_all(["flaky"], timeout_s=5)
        return code, restarts, calls, steady

    code, restarts, calls, steady = run(main())
    assert code == 1 and restarts == {"steady": 1.0, "flaky": 2.0}
    assert len(calls) == 3 and calls[2] - calls[1] >= 0.1  # the second restart waited twice the backoff
    assert steady.proc.poll() is not None and said[-1] == "stopped steady (exit code -15)"  # stop_all did
    assert any("steady (pid" in line and "exited with code -9; restarting it in 0.1 s" in line for line in said), said
    gave_up = next(line for line in said if "giving up" in line)
    assert gave_up.startswith("error: flaky died 3 times within 60 s") and "giving up" in gave_up
    assert "before it was ready" in gave_up and "boom" in gave_up, gave_up


# --- a real deployment ------------------------------------------------------------------------------------
SERVE = ["serve", "--preset", "tiny", "--port", "0", "--metrics-port", "0", "--num-slots", "4", "--num-pages", "32",
         "--max-batch-tokens", "64", "--restart-backoff", "0.2", "--forget-after", "5", "--heartbeat", "0.5"]


def _children_of(pid: int) -> dict[int, str]:
    """pid → command line of each process whose parent is pid."""
    kids = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                kids[int(stat.parent.name)] = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError):
            continue
    return kids


def _child_pid(serve_pid: int, role: str) -> int:
    return next(pid for pid, cmd in _children_of(serve_pid).items() if f"sparsepd {role}" in cmd)


def _restarts(url: str) -> dict[str, int]:
    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    return {k: int(float(v)) for k, v in re.findall(r'^sparsepd_serve_restarts_total\{child="([^"]+)"\} (\S+)$',
                                                      text, re.M)}


def _wait_log(child: Child, pattern: str, timeout_s: float = 120.0) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        found = next((line for line in list(child.log_tail) if re.search(pattern, line)), None)
        if found is not None:
            return found
        assert time.monotonic() < deadline, f"no line matching {pattern!r}:\n" + "\n".join(child.log_tail)
        time.sleep(0.2)


async def _serve_one(address: str, prompt: list[int], n: int, timeout_s: float = 120.0):
    """Wait until the router serves again (a fresh channel each try: no reconnect backoff), then one request;
    its outcome and the router's worker table once everything is free."""
    deadline = time.monotonic() + timeout_s
    while True:
        async with channel(address) as ch:
            try:
                if (await stub_of(ch).HealthCheck(pb.HealthCheckRequest(), timeout=5)).healthy:
                    break
            except grpc.aio.AioRpcError:  # the router is still coming back
                pass
        assert time.monotonic() < deadline, "the router did not serve again"
        await asyncio.sleep(0.2)
    async with channel(address) as ch:
        stub = stub_of(ch)
        outcome = await outcome_of(stub, generate_request(prompt, n))
        loads = await wait_all_free(stub, timeout=20)
        return outcome, {x.worker_address: x.alive for x in loads.loads}


async def _forgotten(address: str, worker: str, timeout_s: float = 30.0) -> dict[str, bool]:
    """Poll the router's table until `worker` has left it; the table then."""
    deadline = time.monotonic() + timeout_s
    async with channel(address) as ch:
        while True:
            loads = await stub_of(ch).GetLoads(pb.GetLoadsRequest())
            table = {x.worker_address: x.alive for x in loads.loads}
            if worker not in table:
                return table
            assert time.monotonic() < deadline, table
            await asyncio.sleep(0.2)


@pytest.mark.slow  # about 1.5 minutes on 2 loaded cores: two restarts and a wait for the forget
def test_serve_restarts_a_killed_decode_worker_and_router():
    prompt = [256, *b"supervised"]
    want = ("length", "", reference(prompt, 8))
    served = start("serve", SERVE, timeout_s=300)
    try:
        first_decode = served.ready["decode"][0]
        os.kill(_child_pid(served.pid, "decode-worker"), signal.SIGKILL)
        _wait_log(served, r"error: decode-0 \(pid \d+\) exited with code -9; restarting it")
        _wait_log(served, r"decode-0 is back")
        outcome, _ = run(_serve_one(served.ready["grpc"], prompt, 8))
        assert outcome == want
        table = run(_forgotten(served.ready["grpc"], first_decode))  # after --forget-after
        assert sorted(table.values()) == [True, True], table  # one prefill, one (new) decode worker

        os.kill(_child_pid(served.pid, "router"), signal.SIGKILL)
        _wait_log(served, r"error: router \(pid \d+\) exited with code -9; restarting it")
        outcome, table = run(_serve_one(served.ready["grpc"], prompt, 8))  # the same address
        assert outcome == want and sorted(table.values()) == [True, True], table
        assert _restarts(served.ready["serve_metrics"]) == {"decode-0": 1, "router": 1}
        assert served.alive()
        os.kill(served.pid, signal.SIGTERM)
        code = served.proc.wait(60)
    finally:
        stop(served)
    assert code == 0, "\n".join(served.log_tail)


def test_serve_gives_up_on_a_worker_that_dies_at_start():
    env = {**os.environ, "SPARSEPD_FAULTS": "decode.start=crash"}
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "sparsepd", *SERVE, "--max-restarts", "2"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("serve did not give up")
    assert proc.returncode == 1 and "READY" not in out, err
    assert len(re.findall(r"error: decode-0 exited with code 70 before it was ready; restarting it", err)) == 2, err
    assert re.search(r"error: decode-0 died 3 times within 300 s \(at most 2 restarts allowed there\): giving up", err)
    assert "fault injection: crashing at decode.start" in err  # its last lines come with it
    assert "stopped router" in err and "stopped prefill-0" in err
    print(f"gave up after {time.monotonic() - t0:.1f} s")
