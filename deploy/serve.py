"""`sparsepd serve`: the whole deployment on one host in one command — the router, M decode workers and N
prefill workers (the same commands a multi-host deployment runs by hand: the workers register with the
router), optionally the SGLang model gateway in front for OpenAI-compatible HTTP. Waits until every process
is ready and the router has every worker, prints where to connect, and then supervises
(deploy/supervisor.py): a process that exits is reported (which one, its exit code, its last log lines)
and started again with backoff while the others keep serving; a restarted worker registers with the router
again, a restarted router comes back on the same ports and the workers find it through their heartbeat.
Serve exits on Ctrl-C/SIGTERM (0), or when one process died more than --max-restarts times within
--restart-window (1, naming it).

Authentication is on: the children share a cluster token (from --cluster-token-file or
$SPARSEPD_CLUSTER_TOKEN, else a new random one, the same for every restart), handed to them in their
environment, never on a command line. `--tls-cert`/`--tls-key` with `--cluster-tls-ca` make every gRPC port
TLS (the router's public one and the workers', which register with the router over it), `--tls-client-ca`
makes the router's mutual; the workers listen on 127.0.0.1 only. The HTTP gateway binds 127.0.0.1 unless
--http-host says otherwise (it has no authentication of its own).
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

import grpc

from sparsepd.cluster_token import TOKEN_ENV, AuthorizedStub, add_token_args, generate_token, token_from_args
from sparsepd.default_model import PRESET_HELP, choose_model
from sparsepd.deploy.group import ready_ranks
from sparsepd.deploy.launch import Child, LaunchError, start, stop
from sparsepd.deploy.supervisor import GaveUp, RestartPolicy, Supervisor
from sparsepd.gpu_wait import GPU_WAIT_HELP, GPU_WAITS
from sparsepd.load_flags import add_load_args
from sparsepd.process import print_ready, stop_on_signals
from sparsepd.proto import sglang_scheduler_pb2 as pb
from sparsepd.proto import sglang_scheduler_pb2_grpc as pb_grpc
from sparsepd.router.main import add_dispatch_arguments, add_model_arguments
from sparsepd.router.model_card import card_for
from sparsepd.tls import TlsConfig, cluster_channel, tls_from_args

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
    p.add_argument("--ep", type=int, default=1, metavar="N",
                   help="each decode (or colocated) worker is a group of N ranks, one process per device, taking N "
                        "devices of --devices in turn: data-parallel attention, the routed experts split N ways "
                        "(default: 1, one process per worker)")
    p.add_argument("--prefill-ep", type=int, default=None, metavar="N",
                   help="the same for each prefill worker (default: --ep)")
    add_model_arguments(p, PRESET_HELP)
    add_load_args(p)  # handed to the router (its fingerprint) and every worker
    w = p.add_argument_group("workers (passed to every worker; defaults are the workers')")
    w.add_argument("--seed", type=int, default=None, help="random-weight seed")
    w.add_argument("--num-slots", type=int, default=None, help="requests holding state at once, per worker")
    w.add_argument("--num-pages", type=int, default=None, help="KV pages per worker")
    w.add_argument("--max-batch-tokens", type=int, default=None, help="tokens per forward")
    w.add_argument("--kv-memory", type=int, default=None, help="bytes for pages, slots and scratch per worker")
    w.add_argument("--speculative-num-steps", type=int, default=None, metavar="K",
                   help="decode workers draft K tokens a step with the checkpoint's MTP layer (default: 0, off)")
    w.add_argument("--gpu-wait", choices=GPU_WAITS, default=None,
                   help=GPU_WAIT_HELP + "; every worker (default: the workers', spin)")
    w.add_argument("--prefill-cuda-graph", action="store_true",
                   help="every worker replays CUDA graphs for forwards of a few prompt chunks (see a worker's --help)")
    w.add_argument("--prefix-cache-entries", type=int, default=None,
                   help="prompts whose state each prefill (or colocated) worker keeps for requests that start "
                        "with them (default: the worker's, 256)")
    w.add_argument("--max-retracted-memory", type=int, default=None, metavar="BYTES",
                   help="host memory each decode (or colocated) worker lets retracted requests' states take; past it "
                        "the newest decoding request fails RESOURCE_EXHAUSTED (default: the worker's, its KV pool's "
                        "size; a colocated worker with --prefix-cache-host-bytes shares that bound instead)")
    w.add_argument("--prefix-cache-host-bytes", type=int, default=None,
                   help="host memory for prefix-cache snapshots and pages evicted from the device, per prefill (or "
                        "colocated) worker; a colocated worker's retracted states share it (default: the worker's, 0)")
    w.add_argument("--disable-prefix-cache", action="store_true",
                   help="prefill every request from its first token (no prefix cache on the prefill or colocated "
                        "workers)")
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
    r = p.add_argument_group("supervision: a process that exits is started again")
    r.add_argument("--max-restarts", type=int, default=5,
                   help="restarts of one process within --restart-window before serve gives up and stops everything "
                        "(default: %(default)s)")
    r.add_argument("--restart-window", type=float, default=300.0, help="seconds (default: %(default)s)")
    r.add_argument("--restart-backoff", type=float, default=1.0,
                   help="seconds before a restart, doubled for each recent one up to 30 (default: %(default)s)")
    r.add_argument("--heartbeat", type=float, default=2.0,
                   help="seconds between the workers' registrations: how soon a restarted router has them all again "
                        "(default: %(default)s)")
    r.add_argument("--serve-metrics-port", type=int, default=None,
                   help="Prometheus port of serve's own metrics (restarts); default: --metrics-port + 1, any free "
                        "port when that is 0, off when it is -1")
    p.add_argument("--start-timeout", type=float, default=300.0,
                   help="seconds each process may take to become ready (default: %(default)s)")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="on Ctrl-C/SIGTERM: seconds the requests in flight may take to finish before they are "
                        "aborted; then every process stops (default: %(default)s)")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--child-logs", action="store_true",
                   help="print every process's log lines on stderr, each prefixed with its name (default: only "
                        "those of a process that exits)")
    add_token_args(p)
    t = p.add_argument_group("TLS (PEM files): every process serves and dials TLS with these")
    t.add_argument("--tls-cert", default=None, metavar="PATH",
                   help="certificate chain (with --tls-key and --cluster-tls-ca); it must name 127.0.0.1, where "
                        "the processes reach each other, besides the names clients use")
    t.add_argument("--tls-key", default=None, metavar="PATH", help="private key of --tls-cert")
    t.add_argument("--cluster-tls-ca", default=None, metavar="PATH",
                   help="the CA that signed --tls-cert: the processes verify each other with it")
    t.add_argument("--tls-client-ca", default=None, metavar="PATH",
                   help="the router requires clients to present a certificate signed by this CA (mutual TLS)")


def children_env(args: argparse.Namespace) -> dict[str, str]:
    """The environment that hands every child the deployment's token: the one given, else a new one."""
    if args.no_cluster_auth:
        return {}
    given = args.cluster_token_file or os.environ.get(TOKEN_ENV)
    return {TOKEN_ENV: token_from_args(args) if given else generate_token()}


async def serve(args: argparse.Namespace) -> int:
    args.preset, args.checkpoint = choose_model(args.preset, args.checkpoint)  # handed to every child explicitly
    if args.colocated and args.prefill is not None:
        raise ValueError("--colocated runs no prefill workers: drop --prefill (--decode M sets the worker count)")
    args.prefill = 0 if args.colocated else (1 if args.prefill is None else args.prefill)
    if args.decode < 1 or (args.prefill < 1 and not args.colocated):
        raise ValueError(f"--prefill and --decode must be ≥ 1, got {args.prefill} and {args.decode}")
    if args.tls_cert is not None and args.cluster_tls_ca is None:
        raise ValueError("--tls-cert needs --cluster-tls-ca, the CA that signed it: the workers register with the "
                         "router over TLS and must verify it")
    if args.http_port is not None and args.tls_cert is not None:
        raise ValueError("--http-port with --tls-cert: the gateway dials the router in plaintext gRPC; put a "
                         "TLS-terminating proxy in front of the gateway instead")
    tls_from_args(args)  # unreadable or mismatched PEM files: say so before starting anything
    if args.http_port is not None and gateway_command() is None:
        print(f"error: --http-port needs the SGLang model gateway (smg), which is not installed: {HTTP_INSTALL}",
              file=sys.stderr)
        return 2
    policy = RestartPolicy(max_restarts=args.max_restarts, window_s=args.restart_window,
                           backoff_s=args.restart_backoff, max_backoff_s=max(args.restart_backoff, 30.0))
    supervisor = Supervisor(policy, _say)
    stop_event = stop_on_signals(asyncio.get_running_loop())
    starting = asyncio.create_task(_start_all(args, supervisor))
    stopped = asyncio.create_task(stop_event.wait())
    await asyncio.wait({starting, stopped}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if not starting.done():  # Ctrl-C/SIGTERM while starting
        supervisor.stop_all(STOP_FIRST, timeout_s=15.0)
        starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
        return 0
    try:
        endpoints = starting.result()
    except (LaunchError, GaveUp, TimeoutError) as exc:
        _say(f"error: {exc}")
        supervisor.stop_all(STOP_FIRST, timeout_s=15.0)
        return 1
    print_ready("serve", **endpoints)
    _say(f"ready: gRPC (SGLang scheduler API) at {endpoints['grpc']}")
    _say(f"  try:  sparsepd generate \"Hello\" --router {endpoints['grpc']}")
    if "http" in endpoints:
        _say(f"  OpenAI base URL: {endpoints['http']}/v1")
        _say(f"  try:  curl {endpoints['http']}/v1/completions -H 'Content-Type: application/json' "
             f"-d '{{\"model\": \"{endpoints['model']}\", \"prompt\": \"Hello\", \"max_tokens\": 16}}'")
    for key, what in (("metrics", "the router's"), ("serve_metrics", "serve's restarts")):
        if key in endpoints:
            _say(f"  metrics: {endpoints[key]} ({what})")
    _say("a process that exits is restarted; Ctrl-C stops everything")
    code = await supervisor.watch(stop_event)
    if code == 0:
        _say("stopping ...")
    supervisor.stop_all(STOP_FIRST, timeout_s=args.drain_timeout + 15.0)
    return code


STOP_FIRST = ["gateway", "router"]  # then the workers, when nothing is left in flight


async def _start_all(args: argparse.Namespace, supervisor: Supervisor) -> dict:
    """The router first (it waits for workers to register), then every worker at once with `--router` (so a
    restarted one registers again), then the gateway; returns the endpoints once the router has every worker."""
    prefill_ep = args.prefill_ep or args.ep
    if args.ep < 1 or prefill_ep < 1:
        raise ValueError(f"--ep {args.ep} and --prefill-ep {prefill_ep} must be ≥ 1")
    names = _devices(args.devices, args.decode * args.ep + args.prefill * prefill_ep)
    devices = [_worker_devices(names, i * args.ep, args.ep) for i in range(args.decode)]
    devices += [_worker_devices(names, args.decode * args.ep + i * prefill_ep, prefill_ep) for i in range(args.prefill)]
    kind = "colocated" if args.colocated else "decode"
    env = children_env(args)  # once: a restarted process gets the same token
    _say("starting the router ...")
    router_args = _router_args(args)
    router = await supervisor.start("router", _launcher("router", router_args, args, env))
    where = router.ready["grpc"]
    _pin(router_args, "--port", where.rpartition(":")[2])  # a restarted router comes back where clients know it
    endpoints = {"grpc": where, "model": router.ready["model"]}
    if "metrics" in router.ready:
        endpoints["metrics"] = router.ready["metrics"]
        _pin(router_args, "--metrics-port", router.ready["metrics"].rsplit(":", 1)[1].split("/")[0])
    port = _serve_metrics_port(args)
    if port >= 0:
        endpoints["serve_metrics"] = f"http://127.0.0.1:{supervisor.serve_metrics('127.0.0.1', port)}/metrics"
    workers = worker_commands(args, devices, where)
    _say(f"starting {args.decode} {kind} and {args.prefill} prefill workers ...")
    started = await asyncio.gather(*(supervisor.start(name, _launcher(name, cmd, args, env))
                                     for name, cmd in workers), return_exceptions=True)
    failed = next((r for r in started if isinstance(r, BaseException)), None)
    if failed is not None:
        raise failed
    # a group registers each rank as a worker of its own (docs/DESIGN.md §9): the router lists every rank
    addresses = {name: [r["grpc"] for r in ready_ranks(child.ready)]
                 for (name, _), child in zip(workers, started, strict=True)}
    endpoints["prefill"] = [a for name, ranks in addresses.items() if name.startswith("prefill-") for a in ranks]
    endpoints[kind] = [a for name, ranks in addresses.items() if name.startswith(f"{kind}-") for a in ranks]
    await _wait_registered(where, {a for ranks in addresses.values() for a in ranks}, args.start_timeout,
                           env.get(TOKEN_ENV), tls_from_args(args))
    if args.http_port is not None:
        _say(f"starting the HTTP gateway (smg) on {args.http_host}:{args.http_port} ...")
        ports = [args.http_port, args.http_metrics_port]

        def launch_gateway(on_spawn):
            gateway = start_gateway(where, ports[0], ports[1], args.start_timeout, host=args.http_host,
                                    tokenizer=card_for(args.preset, args.checkpoint).has_tokenizer,
                                    on_spawn=on_spawn)
            ports[:] = [gateway.ready["port"], gateway.ready["metrics_port"]]  # a restart comes back there
            return gateway

        gateway = await supervisor.start("gateway", launch_gateway)
        endpoints["http"] = f"http://{args.http_host}:{gateway.ready['port']}"
        endpoints["http_metrics"] = f"http://127.0.0.1:{gateway.ready['metrics_port']}/metrics"
    return endpoints


def _launcher(name: str, cmd: list[str], args: argparse.Namespace, env: dict[str, str]):
    return lambda on_spawn: start(name, cmd, args.start_timeout, env=env, echo_stderr=args.child_logs,
                                  on_spawn=on_spawn)


def _router_args(args: argparse.Namespace) -> list[str]:
    out = ["router", "--host", args.host, "--port", str(args.port), "--metrics-port", str(args.metrics_port),
           "--preset", args.preset, "--max-queue", str(args.max_queue), "--batch-tokens", str(args.batch_tokens),
           "--batch-wait-ms", str(args.batch_wait_ms), "--reserve-ttl", str(args.reserve_ttl),
           "--forget-after", str(args.forget_after), "--heartbeat", str(args.heartbeat),
           "--max-migrations", str(args.max_migrations), "--worker-wait", str(args.worker_wait),
           "--drain-timeout", str(args.drain_timeout), "--stream-interval", str(args.stream_interval),
           "--log-level", args.log_level, *_load_flags(args)]
    for flag, value in (("--checkpoint", args.checkpoint), ("--served-model-name", args.served_model_name),
                        ("--max-new-tokens-limit", args.max_new_tokens_limit), ("--seed", args.seed),
                        ("--timing-log", args.timing_log),
                        *_tls_flags(args), ("--tls-client-ca", args.tls_client_ca)):
        if value is not None:
            out += [flag, str(value)]
    if args.no_cluster_auth:
        out.append("--no-cluster-auth")
    if args.batch_wait_idle:
        out.append("--batch-wait-idle")
    return out


def _load_flags(args: argparse.Namespace) -> list[str]:
    """The weight options, the same for the router (its fingerprint) and every worker."""
    flags = ["--load-format", args.load_format, "--dtype", args.dtype]
    return flags + (["--num-layers", str(args.num_layers)] if args.num_layers is not None else [])


def worker_commands(args: argparse.Namespace, devices: list[list[str]], router: str) -> list[tuple[str, list[str]]]:
    """(name, `sparsepd` arguments) of every worker: decode (or colocated) workers first, then prefill ones;
    `devices[i]`: worker i's device arguments (`_worker_devices`)."""
    kind = "colocated" if args.colocated else "decode"
    common = [*_worker_flags(args), "--router", router]
    colocated = ["--colocated", *_cache_flags(args)] if args.colocated else []
    retracted = ["--max-retracted-memory", str(args.max_retracted_memory)] if args.max_retracted_memory is not None \
        else []
    if args.speculative_num_steps is not None:  # decode workers draft; prefill workers ship the MTP layer's state
        common = [*common, "--speculative-num-steps", str(args.speculative_num_steps)]
    workers = [(f"{kind}-{i}", ["decode-worker", *common, *colocated, *retracted, *devices[i]])
               for i in range(args.decode)]
    return workers + [(f"prefill-{i}", ["prefill-worker", *common, *_cache_flags(args), *devices[args.decode + i]])
                      for i in range(args.prefill)]


def _cache_flags(args: argparse.Namespace) -> list[str]:
    flags = ["--disable-prefix-cache"] if args.disable_prefix_cache else []
    if args.prefix_cache_entries is not None:
        flags += ["--prefix-cache-entries", str(args.prefix_cache_entries)]
    if args.prefix_cache_host_bytes is not None:
        flags += ["--prefix-cache-host-bytes", str(args.prefix_cache_host_bytes)]
    return flags


def _tls_flags(args: argparse.Namespace) -> list[tuple[str, str | None]]:
    return [("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key), ("--cluster-tls-ca", args.cluster_tls_ca)]


def _pin(argv: list[str], flag: str, value: str) -> None:
    argv[argv.index(flag) + 1] = value


def _serve_metrics_port(args: argparse.Namespace) -> int:
    if args.serve_metrics_port is not None:
        return args.serve_metrics_port
    return args.metrics_port + 1 if args.metrics_port > 0 else args.metrics_port


async def _wait_registered(router: str, addresses: set[str], timeout_s: float, token: str | None,
                           tls: TlsConfig) -> None:
    """Until the router lists every worker address as alive (they register when they are up; the router shows
    addresses to callers with the cluster token only)."""
    deadline = time.monotonic() + timeout_s
    async with cluster_channel(router, tls) as channel:
        stub = AuthorizedStub(pb_grpc.SglangSchedulerStub(channel), token)
        while True:
            try:
                loads = await stub.GetLoads(pb.GetLoadsRequest(include=["core"]), timeout=5)
                missing = addresses - {x.worker_address for x in loads.loads if x.alive}
            except grpc.aio.AioRpcError as exc:
                missing = addresses
                why = f"{exc.code().name}: {exc.details()}"
            else:
                why = "not registered or not answering"
            if not missing:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"the router at {router} did not list workers {sorted(missing)} within "
                                   f"{timeout_s:g} s ({why})")
            await asyncio.sleep(0.2)


def _worker_flags(args: argparse.Namespace) -> list[str]:
    flags = ["--preset", args.preset, "--log-level", args.log_level, "--drain-timeout", str(args.drain_timeout),
             *_load_flags(args)]
    if args.no_cluster_auth:
        flags.append("--no-cluster-auth")
    if args.prefill_cuda_graph:
        flags.append("--prefill-cuda-graph")
    for flag, value in (("--checkpoint", args.checkpoint), ("--seed", args.seed), ("--num-slots", args.num_slots),
                        ("--num-pages", args.num_pages), ("--max-batch-tokens", args.max_batch_tokens),
                        ("--kv-memory", args.kv_memory), ("--gpu-wait", args.gpu_wait), *_tls_flags(args)):
        if value is not None:
            flags += [flag, str(value)]
    return flags


def _worker_devices(names: list[str], first: int, ep: int) -> list[str]:
    """A worker's device flags: `--device D`, or `--devices D1,…,DN --ep N` for a group (deploy/group.py)."""
    if ep == 1:
        return ["--device", names[first]]
    return ["--devices", ",".join(names[first:first + ep]), "--ep", str(ep)]


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
                  host: str = "127.0.0.1", on_spawn=None, tokenizer: bool = True) -> Child:
    """Start `smg launch` in front of the router, bound to `host`, and wait until it serves the model (and, when
    the model has a tokenizer, until the gateway has it: text requests need it)."""
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
    if on_spawn is not None:
        on_spawn(child)

    def pump() -> None:
        for line in proc.stdout:
            child.log_tail.append(line.rstrip())

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while not _gateway_ready("127.0.0.1" if host in ("0.0.0.0", "::") else host, port, tokenizer):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(child)
            reason = f"exited with code {proc.returncode}" if proc.returncode is not None else "timed out"
            raise LaunchError(f"gateway {reason} before it was ready", "\n".join(list(child.log_tail)[-15:]))
        time.sleep(0.2)
    return child


def _gateway_ready(host: str, port: int, tokenizer: bool = True) -> bool:
    """The gateway lists the model and says it is ready: it answers /v1/models before it has fetched the
    tokenizer (GetTokenizer), and until then a completion gets 503 "tokenizer not yet registered"."""
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/v1/models", timeout=2) as r:
            if r.status != 200 or b'"id"' not in r.read():
                return False
        if not tokenizer:
            return True
        with urllib.request.urlopen(f"http://{host}:{port}/readiness", timeout=2) as r:
            return r.status == 200
    except OSError:  # (urllib's HTTPError for the 503 is one)
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

