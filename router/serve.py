"""`sparsepd serve`: the whole deployment on one host in one command — M decode workers, N prefill
workers and the router (the same commands a multi-host deployment runs by hand), optionally the SGLang
model gateway in front for OpenAI-compatible HTTP. Waits until every process is ready, prints where to
connect, and stops everything on Ctrl-C/SIGTERM. A process that dies is reported (which one, its exit
code, its last log lines) and everything else is stopped: nothing is restarted behind your back.

Authentication is on: the children share a cluster token (from --cluster-token-file or
$SPARSEPD_CLUSTER_TOKEN, else a new random one), handed to them in their environment, never on a command
line. `--tls-cert`/`--tls-key` (and `--tls-client-ca`) make the router's public port TLS; the workers listen
on 127.0.0.1 only. The HTTP gateway binds 127.0.0.1 unless --http-host says otherwise (it has no
authentication of its own).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from sparsepd.cluster_token import TOKEN_ENV, add_token_args, generate_token, token_from_args
from sparsepd.launch import Child, LaunchError, start, stop
from sparsepd.process import print_ready, stop_on_signals
from sparsepd.router.main import add_dispatch_arguments, add_model_arguments

HTTP_INSTALL = "pip install 'sparsepd[http]'"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address of the router's gRPC server (default: %(default)s)")
    p.add_argument("--port", type=int, default=30000, help="the router's gRPC port; 0 = any (default: %(default)s)")
    p.add_argument("--prefill", type=int, default=None, metavar="N", help="prefill workers (default: 1)")
    p.add_argument("--decode", type=int, default=1, metavar="M",
                   help="decode workers, or colocated workers with --colocated (default: %(default)s)")
    p.add_argument("--colocated", action="store_true",
                   help="no disaggregation: M workers that each prefill and decode in one engine, behind the same "
                        "router and API (the baseline PD is compared with)")
    p.add_argument("--devices", default="auto",
                   help="comma-separated devices handed to the workers in turn (decode first), e.g. cuda:0,cuda:1; "
                        "auto = every CUDA device, or cpu when there is none (default: %(default)s)")
    add_model_arguments(p)
    w = p.add_argument_group("workers (passed to every worker; defaults are the workers')")
    w.add_argument("--seed", type=int, default=None, help="random-weight seed")
    w.add_argument("--num-slots", type=int, default=None, help="requests holding state at once, per worker")
    w.add_argument("--num-pages", type=int, default=None, help="KV pages per worker")
    w.add_argument("--max-batch-tokens", type=int, default=None, help="tokens per forward")
    w.add_argument("--kv-memory", type=int, default=None, help="bytes for pages, slots and scratch per worker")
    add_dispatch_arguments(p)
    p.add_argument("--metrics-port", type=int, default=30090,
                   help="the router's Prometheus port; 0 = any, -1 = off (default: %(default)s)")
    h = p.add_argument_group("OpenAI-compatible HTTP (the SGLang model gateway)")
    h.add_argument("--http-port", type=int, default=None,
                   help=f"also start `smg` on --http-host:PORT in front of the router (needs: {HTTP_INSTALL})")
    h.add_argument("--http-host", default="127.0.0.1",
                   help="the gateway's address; it authenticates no one, so another than 127.0.0.1 opens the "
                        "service to that network (default: %(default)s)")
    h.add_argument("--http-metrics-port", type=int, default=0,
                   help="the gateway's Prometheus port on 127.0.0.1; 0 = any free port (default: 0)")
    p.add_argument("--start-timeout", type=float, default=300.0,
                   help="seconds each process may take to become ready (default: %(default)s)")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="on Ctrl-C/SIGTERM: seconds the requests in flight may take to finish before they are "
                        "aborted; then every process stops (default: %(default)s)")
    p.add_argument("--log-level", default="INFO")
    add_token_args(p)
    t = p.add_argument_group("TLS for the router's public port (PEM files)")
    t.add_argument("--tls-cert", default=None, metavar="PATH", help="certificate chain (with --tls-key)")
    t.add_argument("--tls-key", default=None, metavar="PATH", help="private key of --tls-cert")
    t.add_argument("--tls-client-ca", default=None, metavar="PATH",
                   help="require clients to present a certificate signed by this CA (mutual TLS)")


def children_env(args: argparse.Namespace) -> dict[str, str]:
    """The environment that hands every child the deployment's token: the one given, else a new one."""
    if args.no_cluster_auth:
        return {}
    given = args.cluster_token_file or os.environ.get(TOKEN_ENV)
    return {TOKEN_ENV: token_from_args(args) if given else generate_token()}


async def serve(args: argparse.Namespace) -> int:
    if args.colocated and args.prefill is not None:
        raise ValueError("--colocated runs no prefill workers: drop --prefill (--decode M sets the worker count)")
    args.prefill = 0 if args.colocated else (1 if args.prefill is None else args.prefill)
    if args.decode < 1 or (args.prefill < 1 and not args.colocated):
        raise ValueError(f"--prefill and --decode must be ≥ 1, got {args.prefill} and {args.decode}")
    if args.http_port is not None and args.tls_cert is not None:
        raise ValueError("--http-port with --tls-cert: the gateway dials the router in plaintext gRPC; put a "
                         "TLS-terminating proxy in front of the gateway instead")
    if args.http_port is not None and gateway_command() is None:
        print(f"error: --http-port needs the SGLang model gateway (smg), which is not installed: {HTTP_INSTALL}",
              file=sys.stderr)
        return 2
    stop_event = stop_on_signals(asyncio.get_running_loop())
    children: list[Child] = []
    try:
        endpoints = _start_all(args, children, stop_event)
    except LaunchError as exc:
        _say(f"error: {exc}")
        _stop_all(children)
        return 1
    if stop_event.is_set():
        _stop_all(children)
        return 0
    print_ready("serve", **endpoints)
    _say(f"ready: gRPC (SGLang scheduler API) at {endpoints['grpc']}")
    _say(f"  try:  sparsepd generate \"Hello\" --router {endpoints['grpc']}")
    if "http" in endpoints:
        _say(f"  OpenAI base URL: {endpoints['http']}/v1")
        _say(f"  try:  curl {endpoints['http']}/v1/completions -H 'Content-Type: application/json' "
             f"-d '{{\"model\": \"{endpoints['model']}\", \"prompt\": \"Hello\", \"max_tokens\": 16}}'")
    if "metrics" in endpoints:
        _say(f"  metrics: {endpoints['metrics']}")
    _say("Ctrl-C stops everything")
    code = await _watch(children, stop_event)
    _stop_all(children, args.drain_timeout)
    return code


def _start_all(args: argparse.Namespace, children: list[Child], stop_event: asyncio.Event) -> dict:
    devices = _devices(args.devices, args.prefill + args.decode)
    common = _worker_flags(args)
    env = children_env(args)
    decode, prefill = [], []
    kind = "colocated" if args.colocated else "decode"
    for i in range(args.decode):
        _say(f"starting {kind} worker {i + 1}/{args.decode} on {devices[i]} ...")
        extra = ["--colocated"] if args.colocated else []
        child = start(f"{kind}-{i}", ["decode-worker", *common, *extra, "--device", devices[i]], args.start_timeout,
                      env=env)
        children.append(child)
        decode.append(child.ready["grpc"])
        if stop_event.is_set():
            return {}
    for i in range(args.prefill):
        device = devices[args.decode + i]
        _say(f"starting prefill worker {i + 1}/{args.prefill} on {device} ...")
        child = start(f"prefill-{i}", ["prefill-worker", *common, "--device", device], args.start_timeout, env=env)
        children.append(child)
        prefill.append(child.ready["grpc"])
        if stop_event.is_set():
            return {}
    _say("starting the router ...")
    router_args = ["router", "--host", args.host, "--port", str(args.port), "--metrics-port", str(args.metrics_port),
                   "--preset", args.preset, "--max-queue", str(args.max_queue),
                   "--batch-tokens", str(args.batch_tokens),
                   "--batch-wait-ms", str(args.batch_wait_ms), "--reserve-ttl", str(args.reserve_ttl),
                   "--drain-timeout", str(args.drain_timeout), "--log-level", args.log_level]
    for flag, value in (("--checkpoint", args.checkpoint), ("--served-model-name", args.served_model_name),
                        ("--max-new-tokens-limit", args.max_new_tokens_limit), ("--seed", args.seed),
                        ("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key),
                        ("--tls-client-ca", args.tls_client_ca)):
        if value is not None:
            router_args += [flag, str(value)]
    for addr in prefill:
        router_args += ["--prefill", addr]
    for addr in decode:
        router_args += [f"--{kind}", addr]
    if args.no_cluster_auth:
        router_args.append("--no-cluster-auth")
    router = start("router", router_args, args.start_timeout, env=env)
    children.append(router)
    endpoints = {"grpc": router.ready["grpc"], "model": router.ready["model"], "prefill": prefill, kind: decode}
    if "metrics" in router.ready:
        endpoints["metrics"] = router.ready["metrics"]
    if args.http_port is not None and not stop_event.is_set():
        _say(f"starting the HTTP gateway (smg) on {args.http_host}:{args.http_port} ...")
        gateway = start_gateway(router.ready["grpc"], args.http_port, args.http_metrics_port, args.start_timeout,
                                host=args.http_host)
        children.append(gateway)
        endpoints["http"] = f"http://{args.http_host}:{gateway.ready['port']}"
        endpoints["http_metrics"] = f"http://127.0.0.1:{gateway.ready['metrics_port']}/metrics"
    return endpoints


def _worker_flags(args: argparse.Namespace) -> list[str]:
    flags = ["--preset", args.preset, "--log-level", args.log_level, "--drain-timeout", str(args.drain_timeout)]
    if args.no_cluster_auth:
        flags.append("--no-cluster-auth")
    for flag, value in (("--checkpoint", args.checkpoint), ("--seed", args.seed), ("--num-slots", args.num_slots),
                        ("--num-pages", args.num_pages), ("--max-batch-tokens", args.max_batch_tokens),
                        ("--kv-memory", args.kv_memory)):
        if value is not None:
            flags += [flag, str(value)]
    return flags


def _devices(spec: str, n: int) -> list[str]:
    if spec == "auto":
        import torch

        found = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
        names = found or ["cpu"]
    else:
        names = [d.strip() for d in spec.split(",") if d.strip()]
        if not names:
            raise ValueError(f"--devices {spec!r} names no device")
    return [names[i % len(names)] for i in range(n)]


async def _watch(children: list[Child], stop_event: asyncio.Event) -> int:
    while not stop_event.is_set():
        for child in children:
            if not child.alive():
                tail = "\n".join(list(child.log_tail)[-15:])
                _say(f"error: {child.name} (pid {child.pid}) exited with code {child.proc.returncode}; stopping "
                     f"everything. Its last lines:\n{tail}")
                return 1
        try:
            await asyncio.wait_for(stop_event.wait(), 0.5)
        except TimeoutError:
            pass
    _say("stopping ...")
    return 0


def _stop_all(children: list[Child], drain_s: float = 0.0) -> None:
    for child in reversed(children):  # gateway, router (drains), then the workers (nothing left in flight)
        code = stop(child, timeout_s=drain_s + 15.0)
        _say(f"stopped {child.name} (exit code {code})")


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# --- the SGLang model gateway ----------------------------------------------------------------------------
def gateway_command() -> str | None:
    """The `smg` executable of this environment, or None when the gateway is not installed."""
    if importlib.util.find_spec("smg") is None:
        return None
    beside = Path(sys.executable).parent / "smg"
    return str(beside) if beside.exists() else shutil.which("smg")


def start_gateway(router_grpc: str, port: int, metrics_port: int = 0, timeout_s: float = 120.0,
                  host: str = "127.0.0.1") -> Child:
    """Start `smg launch` in front of the router, bound to `host`, and wait until it serves the model."""
    exe = gateway_command()
    if exe is None:
        raise LaunchError(f"the SGLang model gateway (smg) is not installed: {HTTP_INSTALL}")
    port = port or _free_port()
    metrics_port = metrics_port or _free_port()
    if host not in ("127.0.0.1", "localhost", "::1"):
        _say(f"warning: the HTTP gateway listens on {host}: anyone who reaches it can use the model")
    cmd = [exe, "launch", "--worker-urls", f"grpc://{router_grpc}", "--backend", "sglang", "--host", host,
           "--port", str(port), "--prometheus-host", "127.0.0.1", "--prometheus-port", str(metrics_port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    child = Child("gateway", proc, ready={"port": port, "metrics_port": metrics_port})

    def pump() -> None:
        for line in proc.stdout:
            child.log_tail.append(line.rstrip())

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while not _gateway_ready("127.0.0.1" if host in ("0.0.0.0", "::") else host, port):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(child)
            reason = f"exited with code {proc.returncode}" if proc.returncode is not None else "timed out"
            tail = "\n".join(list(child.log_tail)[-15:])
            raise LaunchError(f"gateway {reason} before it was ready; last lines:\n{tail}")
        time.sleep(0.2)
    return child


def _gateway_ready(host: str, port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/v1/models", timeout=2) as r:
            return r.status == 200 and b'"id"' in r.read()
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sparsepd serve", description=__doc__)
    add_arguments(p)
    return asyncio.run(serve(p.parse_args(argv)))
