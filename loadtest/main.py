"""Load-test a sparsepd router through its public gRPC API (streamed Generate), one point per max
concurrency: random token-id prompts of seeded lengths (or a JSONL file of prompts), Poisson or
all-at-once arrivals, every request generating exactly its output length (ignore_eos). Per point it prints
a table row and appends one JSONL record; --plot draws PNG charts. With --launch it starts `sparsepd serve`
on 127.0.0.1 first and stops it at the end; otherwise it connects only to --router. `--workload multi-turn`
runs conversations whose turns resend their history (a shared system prompt, the previous outputs) to
measure prefix caching, with a per-turn table of TTFT and cached tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import signal
import sys
import uuid
from pathlib import Path
from typing import Any, Protocol

from sparsepd.loadtest.config import LengthRange, LoadTestConfig, MultiTurnConfig, parse_ids, parse_sweep

EPILOG = """\
metrics (the definitions of SGLang's bench_serving and `vllm bench serve`):
  throughput   completed requests, their prompt and generated tokens, per second of the point's duration
               (from its start until its last request ended)
  TTFT         first streamed token's arrival - send time
  ITL          every gap between consecutive streamed chunks (a chunk of k tokens is one gap)
  TPOT         per request (E2E - TTFT) / (output tokens - tokens of the first chunk); requests with no
               token after their first chunk have none
  E2E          final response's arrival - send time
  goodput      completed requests meeting every given SLO, per second
  percentiles  linear interpolation (numpy's default); failed requests are counted by gRPC status and
               left out of every latency and throughput figure

multi-turn workload (--workload multi-turn), one point:
  prompts      turn 1 = system + user_1; turn k+1 = turn k's prompt + its output ids (as the server
               returned them) + user_{k+1}; the system prompt (--system-len random ids) is the same for
               every conversation, each user turn --user-len new random ids
  schedule     conversations wait in a queue, first turns in order; each arrival (--request-rate) sends
               the turn of the conversation at its head, which rejoins the tail when that turn completes;
               a conversation whose next prompt + output would exceed the context stops early (reported)
  per turn     requests, TTFT p50/p90/p99, E2E p50, mean prompt and cached tokens (GenerateComplete's
               cached_tokens), hit rate = sum(cached) / sum(prompt tokens), prefill tokens computed =
               sum(prompt - cached)

examples:
  sparsepd loadtest --launch --sweep 1,4,16
  sparsepd loadtest --router 127.0.0.1:30000 --input-len 2048-8192 --output-len 256 --sweep 1,2,4,8 --plot
  sparsepd loadtest --launch --serve-args "--preset bench --devices cuda:0 --colocated" --label colocated
  sparsepd loadtest --plot-only loadtest_results.jsonl --label pd --label colocated
  sparsepd loadtest --launch --workload multi-turn --conversations 64 --turns 4 --system-len 2048 \
      --user-len 256 --output-len 128 --request-rate 4
"""
MULTI_TURN_OPTIONS = ("conversations", "turns", "system_len", "user_len")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = EPILOG
    t = p.add_argument_group("target")
    t.add_argument("--router", default="127.0.0.1:30000",
                   help="the router's gRPC address HOST:PORT; the only address contacted (default: %(default)s)")
    t.add_argument("--launch", action="store_true",
                   help="start `sparsepd serve --host 127.0.0.1 --port 0 --metrics-port -1 SERVE_ARGS` first, test it, "
                        "stop it at the end (--router is then ignored)")
    t.add_argument("--serve-args", default="",
                   help="options for the launched `sparsepd serve`, one shell-quoted string, e.g. \"--preset bench "
                        "--devices cuda:0,cuda:0 --prefill 1 --decode 1\"; a single option needs the = form: "
                        "--serve-args=--colocated (default: serve's defaults, the trained default model on CPU)")
    t.add_argument("--launch-timeout", type=float, default=900.0,
                   help="seconds the launched server may take to be ready (default: %(default)s)")
    w = p.add_argument_group("workload")
    w.add_argument("--workload", choices=("single-turn", "multi-turn"), default="single-turn",
                   help="single-turn: independent prompts; multi-turn: conversations whose every turn resends the "
                        "conversation so far (a shared system prompt, earlier turns and outputs), for measuring "
                        "prefix caching; one point, see below (default: %(default)s)")
    w.add_argument("--input-len", default=None,
                   help="single-turn prompt tokens: N, or LOW-HIGH drawn uniformly per request (default: 512)")
    w.add_argument("--output-len", default="128",
                   help="generated tokens: N, or LOW-HIGH drawn uniformly per request (per turn in multi-turn) "
                        "(default: %(default)s)")
    w.add_argument("--dataset", default=None, metavar="JSONL",
                   help="prompts from a file instead of random token ids: one object a line with \"input_ids\" "
                        "(token ids) or \"prompt\" (text), and optionally \"output_len\" (else drawn from "
                        "--output-len); used in file order, cycled when short")
    w.add_argument("--seed", type=int, default=0,
                   help="seeds the prompts, their lengths, the arrivals and the sampling (default: %(default)s)")
    w.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy (default: 0)")
    w.add_argument("--stop-token-ids", default="", metavar="IDS",
                   help="token ids every request sends as stop_token_ids, e.g. 128-259; since every request also "
                        "sets min_new_tokens to its output length, they are never drawn: the output keeps to the "
                        "other ids (bench/compare_aiperf.py bans those that decode to no whole character)")
    m = p.add_argument_group("multi-turn workload (--workload multi-turn)")
    m.add_argument("--conversations", type=int, default=None,
                   help="conversations, each sending up to --turns requests one after another (default: 64)")
    m.add_argument("--turns", type=int, default=None,
                   help="turns per conversation; fewer when the next prompt would not fit the context (default: 4)")
    m.add_argument("--system-len", type=int, default=None,
                   help="tokens of the system prompt every conversation begins with, the same random ids for all; "
                        "0 for none (default: 2048)")
    m.add_argument("--user-len", type=int, default=None,
                   help="new random tokens each turn appends after the previous output (default: 256)")
    load = p.add_argument_group("load (each point is bounded in requests and in time)")
    load.add_argument("--sweep", default=None, metavar="C1,C2,...",
                      help="one point per max concurrency, e.g. 1,2,4,8,16,32,64,128,256")
    load.add_argument("--max-concurrency", type=int, default=None,
                      help="a single point with at most this many requests in flight (default: no limit)")
    load.add_argument("--request-rate", type=float, default=float("inf"),
                      help="mean arrivals per second, a Poisson process; inf = all at once (default: inf)")
    load.add_argument("--num-prompts", type=int, default=None,
                      help="requests per point (default: max(16, 4 x concurrency); 64 without a limit)")
    load.add_argument("--max-seconds", type=float, default=300.0,
                      help="per point: no request starts after this many seconds (default: %(default)s)")
    load.add_argument("--drain-seconds", type=float, default=30.0,
                      help="per point: then requests still running get this long before they are cut (counted "
                           "as `cut`, not in the latencies) (default: %(default)s)")
    load.add_argument("--request-timeout", type=float, default=600.0,
                      help="gRPC deadline of one request in seconds (DEADLINE_EXCEEDED counts as an error) "
                           "(default: %(default)s)")
    load.add_argument("--warmup-requests", type=int, default=1,
                      help="requests sent and waited for before the first point, not measured (default: 1)")
    s = p.add_argument_group("service-level objectives (for goodput)")
    s.add_argument("--slo-ttft-ms", type=float, default=None, help="a good request's TTFT is at most this")
    s.add_argument("--slo-tpot-ms", type=float, default=None, help="a good request's TPOT is at most this")
    o = p.add_argument_group("output")
    o.add_argument("--results", default="loadtest_results.jsonl",
                   help="JSONL file one record per point is appended to (default: %(default)s)")
    o.add_argument("--label", action="append", default=None,
                   help="a name stored in each record, one series in the plots (e.g. pd, colocated); with "
                        "--plot-only, repeat it to pick the series to draw (default: all)")
    o.add_argument("--plot", nargs="?", const="", default=None, metavar="PREFIX",
                   help="after the run draw PREFIX_throughput.png and PREFIX_latency.png from the results file's "
                        "records (default PREFIX: the results path without .jsonl); needs matplotlib")
    o.add_argument("--plot-only", default=None, metavar="JSONL",
                   help="run nothing: draw the plots from an existing results file (beside it, or at --plot PREFIX)")
    o.add_argument("--no-progress", action="store_true", help="no progress line on stderr")


def config_from_args(args: argparse.Namespace) -> LoadTestConfig:
    if args.label and len(args.label) > 1:
        raise ValueError(f"--label given {len(args.label)} times: a run stores one label (several only with "
                         "--plot-only)")
    if args.sweep is not None and args.max_concurrency is not None:
        raise ValueError("give --sweep or --max-concurrency, not both")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError(f"--max-concurrency {args.max_concurrency}: expected ≥ 1")
    concurrencies = parse_sweep(args.sweep) if args.sweep is not None else (args.max_concurrency,)
    stop_ids = parse_ids(args.stop_token_ids, "--stop-token-ids") if args.stop_token_ids else ()
    return LoadTestConfig(
        router=args.router, launch=args.launch, serve_args=tuple(shlex.split(args.serve_args)),
        launch_timeout_s=args.launch_timeout, input_len=LengthRange.parse(args.input_len or "512", "--input-len"),
        output_len=LengthRange.parse(args.output_len, "--output-len"), dataset=args.dataset,
        multi_turn=_multi_turn_from_args(args), seed=args.seed,
        temperature=args.temperature, stop_token_ids=stop_ids, concurrencies=concurrencies,
        request_rate=args.request_rate,
        num_prompts=args.num_prompts, max_seconds=args.max_seconds, drain_seconds=args.drain_seconds,
        request_timeout_s=args.request_timeout, warmup_requests=args.warmup_requests, slo_ttft_ms=args.slo_ttft_ms,
        slo_tpot_ms=args.slo_tpot_ms, results=args.results, label=(args.label or [""])[0],
        plot_prefix=None if args.plot is None else (args.plot or _default_prefix(args.results)),
        progress=not args.no_progress)


def _multi_turn_from_args(args: argparse.Namespace) -> MultiTurnConfig | None:
    given = {name: value for name in MULTI_TURN_OPTIONS if (value := getattr(args, name)) is not None}
    if args.workload == "single-turn":
        if given:
            raise ValueError(f"--{next(iter(given)).replace('_', '-')} is for --workload multi-turn")
        return None
    if args.input_len is not None:
        raise ValueError("--input-len is for the single-turn workload; multi-turn prompts are --system-len, then "
                         "--user-len per turn and the outputs before it")
    for name, value in given.items():
        low = 0 if name == "system_len" else 1
        if value < low:
            raise ValueError(f"--{name.replace('_', '-')} {value}: expected ≥ {low}")
    return MultiTurnConfig(**given)


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _default_prefix(results: str) -> str:
    path = Path(results)
    return str(path.with_suffix("")) if path.suffix == ".jsonl" else str(path)


class Launcher(Protocol):
    """How `--launch` starts `sparsepd serve` and stops it: the deploy layer's launcher (deploy/launch.py), which
    the CLI hands in (a role imports nothing above it). `start` returns a child with `.ready` (its READY
    endpoints) and `.pid`, or raises RuntimeError saying why it did not become ready; `stop` returns its exit code."""

    def start(self, name: str, args: list[str], timeout_s: float) -> Any: ...

    def stop(self, child: Any, timeout_s: float) -> int | None: ...


def run(args: argparse.Namespace, launcher: Launcher | None = None) -> int:
    from sparsepd.loadtest import plot

    if args.plot_only is not None:
        from sparsepd.loadtest.report import read_jsonl

        prefix = args.plot or _default_prefix(args.plot_only)
        for path in plot.draw(read_jsonl(args.plot_only), prefix, args.label):
            print(f"wrote {path}")
        return 0
    cfg = config_from_args(args)
    if cfg.plot_prefix is not None:
        plot.require_matplotlib()  # before the run, not after it
    child = None
    address = cfg.router
    if cfg.launch:
        if launcher is None:
            raise ValueError("--launch needs the deployment launcher: run it as `sparsepd loadtest --launch`")
        command = ["serve", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1", *cfg.serve_args]
        print(f"launching: sparsepd {shlex.join(command)}", file=sys.stderr, flush=True)
        try:
            child = launcher.start("serve", command, timeout_s=cfg.launch_timeout_s)
        except RuntimeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        address = child.ready["grpc"]
        print(f"serving at {address} (pid {child.pid})", file=sys.stderr, flush=True)
        signal.signal(signal.SIGTERM, _exit_on_signal)  # so that `finally` stops the server we started
    try:
        code = asyncio.run(_sweep(cfg, address))
    finally:
        if child is not None:
            print(f"stopped the launched server (exit code {launcher.stop(child, timeout_s=60.0)})", file=sys.stderr)
    if code == 0 and cfg.plot_prefix is not None:
        from sparsepd.loadtest.report import read_jsonl

        for path in plot.draw(read_jsonl(cfg.results), cfg.plot_prefix):
            print(f"wrote {path}")
    return code


async def _sweep(cfg: LoadTestConfig, address: str) -> int:
    import grpc

    from sparsepd.loadtest import client, report, workload
    from sparsepd.loadtest.metrics import summarize
    from sparsepd.loadtest.runner import PointSettings, Progress, run_point
    from sparsepd.proto import sglang_scheduler_pb2_grpc as pb_grpc

    async with client.open_channel(address) as channel:
        stub = pb_grpc.SglangSchedulerStub(channel)
        try:
            facts = await client.server_facts(stub)
        except grpc.aio.AioRpcError as exc:
            print(f"error: the router at {address} answered {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
        if cfg.multi_turn is not None:
            return await _multi_turn(cfg, stub, facts, address)
        most = max(cfg.prompts_for(c) for c in cfg.concurrencies)
        if cfg.dataset:
            prompts = workload.file_prompts(cfg.dataset, most + cfg.warmup_requests, cfg.output_len, cfg.seed)
        else:
            prompts = workload.random_prompts(most + cfg.warmup_requests, cfg.input_len, cfg.output_len,
                                              facts.model, cfg.seed)
        warmup, prompts = prompts[most:], prompts[:most]
        if not await _warm_up(cfg, stub, warmup):
            return 1
        run_id, facts_record = _header(cfg, facts, address)
        print(report.table_header(), flush=True)
        empty = []
        for point, concurrency in enumerate(cfg.concurrencies):
            n = cfg.prompts_for(concurrency)
            settings = PointSettings(concurrency, cfg.max_seconds, cfg.drain_seconds, cfg.request_timeout_s,
                                     cfg.temperature, cfg.seed, f"loadtest-{run_id}-c{concurrency}",
                                     cfg.stop_token_ids)
            progress = Progress(f"c={concurrency or 'inf'}", n, cfg.progress)
            arrivals = workload.arrival_offsets_s(n, cfg.request_rate, cfg.seed, point)
            result = await run_point(stub, prompts[:n], arrivals, settings, progress)
            metrics = summarize(result.records, result.duration_s, result.not_sent, cfg.slo_ttft_ms, cfg.slo_tpot_ms)
            report.append_jsonl(cfg.results, report.point_record(cfg, facts_record, concurrency, n, metrics))
            print(report.table_row(concurrency, metrics), flush=True)
            _warn_errors(concurrency, metrics, result.records)
            if metrics["completed"] == 0:
                empty.append(concurrency)
            if not await client.wait_idle(stub):
                print("warning: the router still holds requests 30 s after the point ended", file=sys.stderr)
    if empty:
        print(f"error: no request completed at concurrency {empty}", file=sys.stderr)
        return 1
    return 0


async def _multi_turn(cfg: LoadTestConfig, stub, facts, address: str) -> int:
    """The multi-turn workload's one point: conversations to their end, the point's table row, the per-turn
    table and one JSONL record."""
    import numpy as np

    from sparsepd.loadtest import client, report, workload
    from sparsepd.loadtest.conversation import TIME, make_plan
    from sparsepd.loadtest.metrics import OK, cache_summary, summarize, turn_summary
    from sparsepd.loadtest.multiturn import run_conversations
    from sparsepd.loadtest.runner import PointSettings, Progress

    spec, concurrency = cfg.multi_turn, cfg.concurrencies[0]
    plan = make_plan(spec, cfg.output_len, facts.model, cfg.seed)
    first_turn = LengthRange(low=spec.system_len + spec.user_len, high=spec.system_len + spec.user_len)
    # unrelated random prompts of a first turn's length: they share no prefix with the conversations
    if not await _warm_up(cfg, stub, workload.random_prompts(cfg.warmup_requests, first_turn, cfg.output_len,
                                                             facts.model, cfg.seed)):
        return 1
    run_id, facts_record = _header(cfg, facts, address)
    print(report.table_header(), flush=True)
    settings = PointSettings(concurrency, cfg.max_seconds, cfg.drain_seconds, cfg.request_timeout_s, cfg.temperature,
                             cfg.seed, f"loadtest-{run_id}-mt", cfg.stop_token_ids)
    progress = Progress(f"{spec.conversations}x{spec.turns} turns", spec.requests, cfg.progress)
    gaps = workload.arrival_offsets_s(spec.requests, cfg.request_rate, cfg.seed, 0)
    result = await run_conversations(stub, plan, np.diff(gaps, prepend=0.0), settings, progress)
    metrics = summarize(result.records, result.duration_s, result.not_sent(TIME), cfg.slo_ttft_ms, cfg.slo_tpot_ms)
    metrics.update(turns=turn_summary(result.records, spec.turns),
                   prefix_cache=cache_summary([r for r in result.records if r.status == OK]),
                   conversations=result.summary())
    report.append_jsonl(cfg.results, report.multi_turn_record(cfg, facts_record, concurrency, metrics))
    print(report.table_row(concurrency, metrics))
    print("\n".join(report.multi_turn_lines(metrics)), flush=True)
    _warn_errors(concurrency, metrics, result.records)
    if not await client.wait_idle(stub):
        print("warning: the router still holds requests 30 s after the run ended", file=sys.stderr)
    if metrics["completed"] == 0:
        print("error: no request completed", file=sys.stderr)
        return 1
    return 0


async def _warm_up(cfg: LoadTestConfig, stub, prompts: list) -> bool:
    """Send the warm-up prompts and wait for them; False (said on stderr) when one failed."""
    from sparsepd.loadtest.metrics import OK
    from sparsepd.loadtest.runner import warm_up

    if not prompts:
        return True
    bad = [r for r in await warm_up(stub, prompts, cfg.request_timeout_s, cfg.stop_token_ids) if r.status != OK]
    if bad:
        print(f"error: a warm-up request failed with {bad[0].status}: {bad[0].error}", file=sys.stderr)
    return not bad


def _header(cfg: LoadTestConfig, facts, address: str) -> tuple[str, dict]:
    """A new run id and the run's facts (for every JSONL record), printed as the table's first lines."""
    from sparsepd.loadtest import report

    run_id = uuid.uuid4().hex[:12]
    facts_record = report.run_facts(cfg, run_id, address, facts.preset, facts.served_model_name, facts.workers)
    print(f"# {facts.served_model_name} ({facts_record['device']}, workers {facts.workers}) at {address}; "
          f"label {cfg.label!r}; results → {cfg.results}")
    print(f"# {report.UNITS}")
    return run_id, facts_record


def _warn_errors(concurrency: int | None, metrics: dict, records: list) -> None:
    if metrics["errors"]:
        print(f"warning: c={concurrency}: failed requests {metrics['errors']}, e.g. "
              f"{next(r.error for r in records if r.status in metrics['errors'])}", file=sys.stderr)
