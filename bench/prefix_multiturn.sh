#!/usr/bin/env bash
# GPU multi-turn benchmark of the prefix cache (`sparsepd loadtest --workload multi-turn`): conversations that
# all begin with one shared system prompt, against its own `sparsepd serve` per configuration (router, 1
# prefill and 1 decode worker; on one GPU by default):
#   cache    the prefill worker's prefix cache (radix tree, 256 snapshot slots)
#   nocache  --disable-prefix-cache
#   host     a device tier a quarter of the working set (HOST_ENTRIES slots) and a host tier (HOST_BYTES)
# Writes one JSONL record per run to $OUT/prefix_multiturn.jsonl (with the per-turn table: TTFT, cached and
# computed prefill tokens), the terminal tables to $OUT/prefix_multiturn.log, and after each run the router's
# prefix-cache metrics (hit tokens by tier, evictions by tier, tree size, bytes per tier) to
# $OUT/prefix_metrics_<config>-r<rate>.txt.
#
# What the prefix cache's targets read from it: turn 1 of every conversation after the first restores the
# system prompt (cached = SYSTEM_LEN rounded down to the page; prefill computed ≤ 20% of its prompt), prefill
# tokens computed over turns 1–4 ≥ 85% fewer than without, TTFT p50 ≥ 3× lower on every turn at a rate where
# the uncached run is prefill-bound, turn 1 never slower, output tokens/s not lower; for `host`: the host tier's
# hit tokens (sparsepd_prefix_cache_host_hit_tokens_total) ≥ 50% of all hit tokens.
#
# Run from the repository root:  OUT=/some/dir bench/prefix_multiturn.sh
# About 1-2 minutes per rate and configuration with the defaults. Every knob can be overridden from the
# environment; RATES is a space-separated list (one run per configuration and rate).
set -euo pipefail
cd "$(dirname "$0")/.."

: "${OUT:?set OUT to the folder the results go to}"
PYTHON=${PYTHON:-python3}
RATES=${RATES:-"8 16"}
CONVERSATIONS=${CONVERSATIONS:-64}
TURNS=${TURNS:-4}
SYSTEM_LEN=${SYSTEM_LEN:-2048}
USER_LEN=${USER_LEN:-256}
OUTPUT_LEN=${OUTPUT_LEN:-128}
MAX_SECONDS=${MAX_SECONDS:-300}
SEED=${SEED:-0}
DEVICE=${DEVICE:-cuda:0}
PD_DEVICES=${PD_DEVICES:-$DEVICE,$DEVICE}  # decode worker first, then prefill
SERVE_COMMON=${SERVE_COMMON:-"--preset bench --max-batch-tokens 4096 --num-slots 64"}
HOST_ENTRIES=${HOST_ENTRIES:-160}            # ~ a quarter of the run's ~650 boundary snapshots (64 conversations)
HOST_BYTES=${HOST_BYTES:-4000000000}         # pinned host memory for the host tier
PORT=${PORT:-30500}
export PYTHONSAFEPATH=1  # the checkout's sparsepd/ folder would shadow the installed namespace
METRICS_PORT=${METRICS_PORT:-30590}
CONFIGS=${CONFIGS:-"cache nocache host"}
RESULTS=${RESULTS:-$OUT/prefix_multiturn.jsonl}
LOG=${LOG:-$OUT/prefix_multiturn.log}

if ! "$PYTHON" -P -c "import sparsepd.loadtest, sparsepd.router" 2>/dev/null; then
  echo "error: $PYTHON cannot import sparsepd.loadtest; install the checkout first: $PYTHON -m pip install -e . --no-deps" >&2
  exit 2
fi
mkdir -p "$OUT"
if [ -z "${SPARSEPD_GIT_COMMIT:-}" ] && commit=$(git rev-parse HEAD 2>/dev/null); then
  export SPARSEPD_GIT_COMMIT=$commit
fi

serve_pid=
stop_serve() {
  if [ -n "$serve_pid" ] && kill -0 "$serve_pid" 2>/dev/null; then
    kill -TERM "$serve_pid"
    for _ in $(seq 60); do kill -0 "$serve_pid" 2>/dev/null || break; sleep 1; done
    kill -0 "$serve_pid" 2>/dev/null && kill -KILL "$serve_pid"
  fi
  serve_pid=
}
trap stop_serve EXIT

status=0
for rate in $RATES; do
  for config in $CONFIGS; do
    case $config in
      cache) serve="$SERVE_COMMON --prefix-cache-entries 256" ;;
      nocache) serve="$SERVE_COMMON --disable-prefix-cache" ;;
      host) serve="$SERVE_COMMON --prefix-cache-entries $HOST_ENTRIES --prefix-cache-host-bytes $HOST_BYTES" ;;
      *) echo "error: unknown configuration '$config' in CONFIGS (cache, nocache, host)" >&2; exit 2 ;;
    esac
    label="$config-r$rate"
    serve="$serve --prefill 1 --decode 1 --devices $PD_DEVICES --port $PORT --metrics-port $METRICS_PORT"
    echo "=== $label: sparsepd serve $serve ($(date -u +%FT%TZ))" | tee -a "$LOG"
    start=$SECONDS
    # shellcheck disable=SC2086
    "$PYTHON" -P -m sparsepd serve $serve >"$OUT/serve-$label.log" 2>&1 &
    serve_pid=$!
    until grep -q '^READY' "$OUT/serve-$label.log"; do
      if ! kill -0 "$serve_pid" 2>/dev/null || [ $((SECONDS - start)) -gt 600 ]; then
        echo "=== $label: serve did not start (see $OUT/serve-$label.log)" | tee -a "$LOG"; exit 1
      fi
      sleep 2
    done
    if ! "$PYTHON" -P -m sparsepd loadtest --router "127.0.0.1:$PORT" --label "$label" \
        --workload multi-turn --conversations "$CONVERSATIONS" --turns "$TURNS" --system-len "$SYSTEM_LEN" \
        --user-len "$USER_LEN" --output-len "$OUTPUT_LEN" --request-rate "$rate" --max-seconds "$MAX_SECONDS" \
        --seed "$SEED" --results "$RESULTS" --no-progress 2>&1 | tee -a "$LOG"; then
      echo "=== $label FAILED (see $LOG)" | tee -a "$LOG"
      status=1
    fi
    sleep 3  # one more Stats poll of the workers by the router
    "$PYTHON" -P - "$METRICS_PORT" >"$OUT/prefix_metrics_$label.txt" <<'PY' || true
import sys, urllib.request
text = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=10).read().decode()
print("\n".join(line for line in text.splitlines() if line.startswith("sparsepd_prefix_cache")))
PY
    grep -E 'hit_tokens_total|evictions_total|_bytes\{|_entries\{|_pages\{' "$OUT/prefix_metrics_$label.txt" \
      | tee -a "$LOG" || true
    stop_serve
    echo "=== $label took $((SECONDS - start)) s" | tee -a "$LOG"
  done
done
echo "results: $RESULTS ($(wc -l <"$RESULTS" 2>/dev/null || echo 0) records); log: $LOG"
exit $status
