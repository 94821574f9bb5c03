#!/usr/bin/env python3
"""`sparsepd loadtest` against an independent client: aiperf (PyPI) through the SGLang gateway (`smg`), one
after the other against one server, on the same workload, side by side.

    .venv/bin/python bench/compare_aiperf.py                      # tiny on the CPU: serve, compare, stop
    .venv/bin/python bench/compare_aiperf.py --rounds 3 --concurrency 4,32
    python3 bench/compare_aiperf.py --serve-args "--devices cuda:0,cuda:0 --checkpoint DIR" --input-len 1024 \
        --output-len 256 --concurrency 1,8,64                     # on a GPU (needs a model with a tokenizer)

The same on both sides: the prompts (text written here that the server's own tokenizer, from GetTokenizer,
encodes without special tokens to exactly --input-len ids, as the gateway does: the load test sends those ids,
aiperf the text), exactly --output-len tokens per request (min = max tokens, ignore_eos), greedy sampling,
the concurrency, the request count and the warm-up requests; token counts are the server's on both sides.

Why the ban: the gateway streams an event only when new tokens decode to whole characters, and aiperf times
events (TTFT = the first with text, request latency = the last with text, the run ends at the last one). A
random-weight model emits arbitrary bytes (the tiny preset's vocabulary is bytes), so events come later and
fewer than tokens, and a greedy output that settles on a byte which never completes a character sends no
event for the rest of the request: aiperf's ITL then comes out a third too low. Both clients therefore send
the ids that alone decode to no whole character as stop_token_ids with min = max tokens, so they are never
drawn, and every token is one event (`tok/chunk` shows it: 1.00 on both). `--keep-partial-tokens` turns the
ban off to show the difference.

Definitions, then, agree: output tokens/s = completed requests' tokens ÷ (first send → last response); aiperf's
ITL = (E2E − TTFT) ÷ (output tokens − 1) and the load test's TPOT = (E2E − TTFT) ÷ (output tokens − tokens of
the first chunk), the same when the first chunk holds one token.

The third measurement: the launched router writes a line per request with its own clock (`--timing-log`,
router/timing.py: arrival, when each chunk and the final response left it), and each client run gets a row
`router (CLIENT)` from the lines of the requests that arrived during it (its warm-up, the first ones, left out),
with the load test's definitions. A client whose TPOT or tokens/s stand off the router's row of its own run
measured wrong; rows of the router that differ between the two runs mean the server itself ran differently.

Starts `sparsepd serve --host 127.0.0.1 --port 0 --metrics-port -1 --http-port 0 --timing-log OUT/timing.jsonl
SERVE_ARGS` and stops it by pid at the end (or uses a running one: --router H:P --http URL, and --timing-log for
its router's file). Writes everything under --out; prints one table. Needs aiperf (`pip install aiperf`) and
smg (`pip install 'sparsepd[http]'`).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import shlex
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORDS = "the of and to in is was for on that with as by at from it be this are or an which not have".split()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--serve-args", default="", help="options for the launched `sparsepd serve` (one quoted string)")
    p.add_argument("--router", default=None, help="a running router's gRPC HOST:PORT (with --http: launch nothing)")
    p.add_argument("--http", default=None, help="the running gateway's base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--concurrency", default="4", help="comma-separated, one comparison each (default: 4)")
    p.add_argument("--input-len", type=int, default=63, help="prompt tokens (default: 63)")
    p.add_argument("--output-len", type=int, default=32, help="generated tokens per request (default: 32)")
    p.add_argument("--num-prompts", type=int, default=None, help="requests per run (default: max(32, 8 x conc.))")
    p.add_argument("--warmup", type=int, default=None, help="warm-up requests per run (default: the concurrency)")
    p.add_argument("--rounds", type=int, default=1, help="alternate the two clients this many times (default: 1)")
    p.add_argument("--keep-partial-tokens", action="store_true",
                   help="ban nothing: shows how aiperf's numbers go wrong when tokens reach it as fewer, later events")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="compare_aiperf", help="folder for prompts, exports and logs")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds one client run may take")
    p.add_argument("--timing-log", default=None,
                   help="the running router's --timing-log file (with --router/--http; launched: OUT/timing.jsonl)")
    return p.parse_args(argv)


# --- the workload ------------------------------------------------------------------------------------------
async def fetch_tokenizer(router: str, into: Path):
    """The server's tokenizer files (GetTokenizer), written to `into`, loaded with `tokenizers`; the vocabulary
    size (GetModelInfo)."""
    import grpc
    from tokenizers import Tokenizer

    from sparsepd.proto import sglang_scheduler_pb2 as pb
    from sparsepd.proto import sglang_scheduler_pb2_grpc as pb_grpc
    from sparsepd.proto import smg_common_pb2 as common

    async with grpc.aio.insecure_channel(router) as channel:
        stub = pb_grpc.SglangSchedulerStub(channel)
        vocab_size = (await stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=60)).vocab_size
        data = b"".join([c.data async for c in stub.GetTokenizer(common.GetTokenizerRequest(), timeout=60)])
    into.mkdir(parents=True, exist_ok=True)
    zipfile.ZipFile(io.BytesIO(data)).extractall(into)
    found = next(into.rglob("tokenizer.json"))
    return Tokenizer.from_file(str(found)), found.parent, vocab_size


def partial_ids(tokenizer, vocab_size: int) -> list[int]:
    """Token ids that alone decode to no whole character (a byte of a multi-byte character, a special token):
    the gateway sends text only once tokens decode to whole characters, so a stream of such tokens reaches an
    HTTP client as fewer, later events, and aiperf would time the first and last of those instead of the
    tokens (with random weights about half of the byte-level tiny model's ids are such bytes). Both clients
    ban them (stop_token_ids with min = max tokens: never drawn), so every token is one event on both sides."""
    return [i for i in range(min(vocab_size, tokenizer.get_vocab_size(with_added_tokens=True)))
            if (text := tokenizer.decode([i], skip_special_tokens=True)) == "" or "\ufffd" in text]


def write_prompts(tokenizer, n: int, input_len: int, output_len: int, seed: int, out: Path) -> tuple[Path, Path]:
    """n texts that encode (without special tokens) to exactly input_len ids and decode back to themselves: an
    aiperf single-turn file (text) and a loadtest dataset (the same ids)."""
    rng = random.Random(seed)
    aiperf_rows, loadtest_rows = [], []
    while len(aiperf_rows) < n:
        words = []
        while len(tokenizer.encode(" ".join(words), add_special_tokens=False).ids) < input_len + 8:
            words.append(rng.choice(WORDS))
        ids = tokenizer.encode(" ".join(words), add_special_tokens=False).ids[:input_len]
        text = tokenizer.decode(ids, skip_special_tokens=False)
        if tokenizer.encode(text, add_special_tokens=False).ids != ids:  # a cut that does not round-trip
            continue
        aiperf_rows.append({"text": text, "output_length": output_len})
        loadtest_rows.append({"input_ids": ids, "output_len": output_len})
    a, lt = out / "prompts_aiperf.jsonl", out / "prompts_loadtest.jsonl"
    a.write_text("".join(json.dumps(r) + "\n" for r in aiperf_rows))
    lt.write_text("".join(json.dumps(r) + "\n" for r in loadtest_rows))
    return a, lt


# --- the two clients -----------------------------------------------------------------------------------------
def run_aiperf(http: str, model: str, tokenizer_dir: Path, prompts: Path, conc: int, n: int, warmup: int,
               output_len: int, banned: list[int], out: Path, timeout: float) -> dict:
    exe = shutil.which("aiperf", path=str(Path(sys.executable).parent)) or shutil.which("aiperf")
    if exe is None:
        raise SystemExit("error: aiperf is not installed: pip install aiperf")
    extra = {"min_tokens": output_len, "ignore_eos": True, "temperature": 0}
    if banned:
        extra["stop_token_ids"] = banned
    cmd = [exe, "profile", "--model", model, "--url", http, "--endpoint-type", "completions", "--streaming",
           "--tokenizer", str(tokenizer_dir), "--input-file", str(prompts), "--custom-dataset-type", "single_turn",
           "--dataset-sampling-strategy", "sequential", "--extra-inputs", json.dumps(extra),
           "--concurrency", str(conc),
           "--request-count", str(n), "--warmup-request-count", str(warmup), "--use-server-token-count",
           "--artifact-dir", str(out), "--ui-type", "none", "--no-server-metrics", "--no-gpu-telemetry"]
    _run(cmd, out.with_suffix(".log"), timeout)
    summary = json.loads((out / "profile_export_aiperf.json").read_text())
    records = [json.loads(line) for line in (out / "profile_export.jsonl").read_text().splitlines() if line.strip()]
    records = [r for r in records if r["metadata"].get("benchmark_phase") == "profiling"]

    def avg(tag: str) -> float | None:
        value = summary.get(tag)
        return value.get("avg") if isinstance(value, dict) else None

    def p50(tag: str) -> float | None:
        value = summary.get(tag)
        return value.get("p50") if isinstance(value, dict) else None

    # chunks with text: the one that set TTFT and one per inter-chunk gap after it
    chunks = [len(r["metrics"].get("inter_chunk_latency", {}).get("value", [])) + 1 for r in records]
    return {"client": "aiperf → smg", "req_s": avg("request_throughput"), "out_tok_s": avg("output_token_throughput"),
            "ttft_p50": p50("time_to_first_token"), "tpot_mean": avg("inter_token_latency"),
            "tpot_p50": p50("inter_token_latency"), "e2e_p50": p50("request_latency"),
            "in_tok": avg("input_sequence_length"), "out_tok": avg("output_sequence_length"),
            "tok_per_chunk": (avg("output_sequence_length") or 0) / (sum(chunks) / len(chunks)) if chunks else None,
            "completed": len(records)}


def run_loadtest(router: str, prompts: Path, conc: int, n: int, warmup: int, output_len: int, banned: list[int],
                 seed: int, out: Path, timeout: float) -> dict:
    results = out.with_suffix(".jsonl")
    results.unlink(missing_ok=True)
    cmd = [sys.executable, "-P", "-m", "sparsepd", "loadtest", "--router", router, "--dataset", str(prompts),
           "--output-len", str(output_len), "--max-concurrency", str(conc), "--num-prompts", str(n),
           "--warmup-requests", str(warmup), "--seed", str(seed), "--stop-token-ids", _ranges(banned),
           "--results", str(results), "--no-progress"]
    if not banned:
        cmd = cmd[:cmd.index("--stop-token-ids")] + cmd[cmd.index("--stop-token-ids") + 2:]
    _run(cmd, out.with_suffix(".log"), timeout)
    m = json.loads(results.read_text().splitlines()[-1])["metrics"]
    return {"client": "sparsepd loadtest", "req_s": m["request_throughput"], "out_tok_s": m["output_throughput"],
            "ttft_p50": m["ttft_ms"]["p50"], "tpot_mean": m["tpot_ms"]["mean"], "tpot_p50": m["tpot_ms"]["p50"],
            "e2e_p50": m["e2e_ms"]["p50"], "in_tok": m["total_input_tokens"] / max(m["completed"], 1),
            "out_tok": m["total_output_tokens"] / max(m["completed"], 1), "tok_per_chunk": m["tokens_per_chunk"],
            "completed": m["completed"]}


def _ranges(ids: list[int]) -> str:
    """[1, 2, 3, 7] → "1-3,7" (--stop-token-ids)."""
    runs: list[list[int]] = []
    for i in sorted(ids):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ",".join(f"{a}-{b}" if b > a else str(a) for a, b in runs)


def _run(cmd: list[str], log: Path, timeout: float) -> None:
    with open(log, "w") as f:
        f.write(shlex.join(cmd) + "\n")
        f.flush()
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
    if code != 0:
        tail = "\n".join(log.read_text().splitlines()[-20:])
        raise SystemExit(f"error: {cmd[0]} exited with code {code}; its log {log} ends:\n{tail}")


# --- the table -----------------------------------------------------------------------------------------------
def router_row(client: str, timing_log: Path | None, since: float, until: float, warmup: int) -> dict | None:
    """The router's own figures (router/timing.py) for the requests that arrived in [since, until), the first
    `warmup` of them (the client's warm-up) left out."""
    if timing_log is None or not timing_log.exists():
        return None
    from sparsepd.router import timing

    lines = sorted(timing.read(timing_log, since, until), key=lambda r: r["arrival_unix_s"])[warmup:]
    return {"client": f"router ({client})", **timing.summarize(lines)}


COLUMNS = [("req/s", "req_s", "{:.3f}"), ("out tok/s", "out_tok_s", "{:.2f}"), ("TPOT mean", "tpot_mean", "{:.1f}"),
           ("TPOT p50", "tpot_p50", "{:.1f}"), ("TTFT p50", "ttft_p50", "{:.1f}"), ("E2E p50", "e2e_p50", "{:.1f}"),
           ("in tok", "in_tok", "{:.1f}"), ("out tok", "out_tok", "{:.1f}"), ("tok/chunk", "tok_per_chunk", "{:.2f}")]


def print_table(rows: list[tuple[int, int, dict]]) -> None:
    head = f"{'conc':>4} {'round':>5} {'client':<19}" + "".join(f"{name:>11}" for name, _, _ in COLUMNS)
    print(head)
    for conc, rnd, r in rows:
        cells = "".join(f"{'-' if r.get(k) is None else fmt.format(r[k]):>11}" for _, k, fmt in COLUMNS)
        print(f"{conc:>4} {rnd:>5} {r['client']:<19}{cells}")


def print_agreement(rows: list[tuple[int, int, dict]]) -> None:
    """Per concurrency, ratios of the means over rounds (output tok/s, TPOT mean, TTFT p50, requests/s): loadtest ÷
    aiperf, and each client ÷ the router's own clock over that client's runs."""
    keys = ("out_tok_s", "tpot_mean", "ttft_p50", "req_s")
    pairs = [("sparsepd loadtest", "aiperf → smg"), ("sparsepd loadtest", "router (loadtest)"),
             ("aiperf → smg", "router (aiperf)"), ("router (loadtest)", "router (aiperf)")]
    for conc in sorted({c for c, _, _ in rows}):
        mean = {}
        for client in {name for pair in pairs for name in pair}:
            got = [r for c, _, r in rows if c == conc and r["client"] == client and r.get("completed")]
            if got:
                mean[client] = {k: sum(r[k] for r in got) / len(got) for k in keys}
        for a, b in pairs:
            if a in mean and b in mean:
                x, y = mean[a], mean[b]
                print(f"c={conc}: {a} / {b}".ljust(50) + "  ".join(f"{k} {x[k] / y[k]:.3f}" for k in keys))


# --- the whole comparison ------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    concurrencies = [int(c) for c in args.concurrency.split(",") if c.strip()]
    child = None
    if (args.router is None) != (args.http is None):
        raise SystemExit("error: give both --router and --http (a running server), or neither (launch one)")
    try:
        timing_log = Path(args.timing_log).resolve() if args.timing_log else None
        if args.router is None:
            from sparsepd.deploy.launch import start

            timing_log = out / "timing.jsonl"
            timing_log.unlink(missing_ok=True)
            serve = ["serve", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "-1", "--http-port", "0",
                     "--timing-log", str(timing_log), *shlex.split(args.serve_args)]
            print(f"# launching: sparsepd {shlex.join(serve)}", file=sys.stderr, flush=True)
            child = start("serve", serve, timeout_s=900.0)
            router, http, model = child.ready["grpc"], child.ready["http"], child.ready["model"]
        else:
            router, http, model = args.router, args.http.rstrip("/"), None
        tokenizer, tokenizer_dir, vocab_size = asyncio.run(fetch_tokenizer(router, out / "tokenizer"))
        banned = [] if args.keep_partial_tokens else partial_ids(tokenizer, vocab_size)
        model = model or _model_name(http)
        rows = []
        for conc in concurrencies:
            n = args.num_prompts or max(32, 8 * conc)
            warmup = conc if args.warmup is None else args.warmup
            a_prompts, lt_prompts = write_prompts(tokenizer, n + warmup, args.input_len, args.output_len,
                                                  args.seed, out)
            for rnd in range(1, args.rounds + 1):
                order = ("aiperf", "loadtest") if rnd % 2 else ("loadtest", "aiperf")
                for client in order:
                    started, since = time.monotonic(), time.time()
                    tag = out / f"c{conc}_r{rnd}_{client}"
                    if client == "aiperf":
                        # aiperf sends warm-up requests first from the same file: prompts 0..warmup-1, then n
                        r = run_aiperf(http, model, tokenizer_dir, a_prompts, conc, n, warmup, args.output_len,
                                       banned, tag, args.timeout)
                    else:
                        r = run_loadtest(router, lt_prompts, conc, n, warmup, args.output_len, banned, args.seed,
                                         tag, args.timeout)
                    rows.append((conc, rnd, r))
                    time.sleep(0.5)  # the last timing lines are written as the calls return
                    server = router_row(client, timing_log, since, time.time(), warmup)
                    if server is not None:
                        rows.append((conc, rnd, server))
                    print(f"# c={conc} round {rnd} {client}: {time.monotonic() - started:.0f} s", file=sys.stderr,
                          flush=True)
        print(f"# sparsepd {_commit()} at {router} (gRPC) and {http} (smg); {args.input_len} in / "
              f"{args.output_len} out tokens, greedy, ignore_eos; latencies in ms")
        print_table(rows)
        print_agreement(rows)
        (out / "summary.json").write_text(json.dumps([{"concurrency": c, "round": r, **x} for c, r, x in rows],
                                                     indent=1))
    finally:
        if child is not None:
            from sparsepd.deploy.launch import stop

            print(f"# stopped the server (exit code {stop(child, timeout_s=60.0)})", file=sys.stderr)
    return 0


def _model_name(http: str) -> str:
    import urllib.request

    with urllib.request.urlopen(f"{http}/v1/models", timeout=10) as r:
        return json.loads(r.read())["data"][0]["id"]


def _commit() -> str:
    if os.environ.get("SPARSEPD_GIT_COMMIT"):  # a copy without .git (e.g. a GPU machine)
        return os.environ["SPARSEPD_GIT_COMMIT"]
    got = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                           text=True)
    return (got.stdout.strip() or "?") + ("+dirty" if dirty.stdout.strip() else "")


if __name__ == "__main__":
    sys.exit(main())
