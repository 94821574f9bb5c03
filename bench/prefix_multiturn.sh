#!/usr/bin/env bash
# GPU multi-turn benchmark of the prefix cache (`sparsepd loadtest --workload multi-turn`): conversations that
# all begin with one shared system prompt, run once with the prefill worker's prefix cache (label "cache") and
# once without (`--disable-prefix-cache`, label "nocache"), each against its own `sparsepd serve` (router, 1
# prefill and 1 decode worker; on one GPU by default). Writes one JSONL record per run to
# $OUT/prefix_multiturn.jsonl (with the per-turn table: TTFT, cached and computed prefill tokens) and the
# terminal tables to $OUT/prefix_multiturn.log.
#
# What the prefix cache's targets read from it (docs/DESIGN.md §9): turn 1 of every conversation after the
# first restores the system prompt (cached ≈ SYSTEM_LEN rounded down to the page, prefill computed ≤ 20% of
# its prompt), prefill tokens computed over turns 1–4 ≥ 85% fewer than without, TTFT p50 ≥ 3× lower on every
# turn at a rate where the uncached run is prefill-bound, turn 1 never slower, output tokens/s not lower.
#
# Run from the repository root:  OUT=/some/dir bench/prefix_multiturn.sh
# About 2 minutes per rate and configuration with the defaults. Every knob can be overridden from the
# environment; RATES is a space-separated list (one pair of runs per rate).
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
SERVE_COMMON=${SERVE_COMMON:-"--preset bench --max-batch-tokens 4096 --num-slots 64 --prefix-cache-entries 256"}
CONFIGS=${CONFIGS:-"cache nocache"}
RESULTS=${RESULTS:-$OUT/prefix_multiturn.jsonl}
LOG=${LOG:-$OUT/prefix_multiturn.log}

if ! "$PYTHON" -c "import sparsepd.loadtest, sparsepd.router" 2>/dev/null; then
  echo "error: $PYTHON cannot import sparsepd.loadtest; install the checkout first: $PYTHON -m pip install -e . --no-deps" >&2
  exit 2
fi
mkdir -p "$OUT"
if [ -z "${SPARSEPD_GIT_COMMIT:-}" ] && commit=$(git rev-parse HEAD 2>/dev/null); then
  export SPARSEPD_GIT_COMMIT=$commit
fi

status=0
for rate in $RATES; do
  for config in $CONFIGS; do
    case $config in
      cache) serve="$SERVE_COMMON --prefill 1 --decode 1 --devices $PD_DEVICES" ;;
      nocache) serve="$SERVE_COMMON --prefill 1 --decode 1 --devices $PD_DEVICES --disable-prefix-cache" ;;
      *) echo "error: unknown configuration '$config' in CONFIGS (cache, nocache)" >&2; exit 2 ;;
    esac
    echo "=== $config, $rate requests/s: sparsepd serve $serve ($(date -u +%FT%TZ))" | tee -a "$LOG"
    start=$SECONDS
    if ! "$PYTHON" -m sparsepd loadtest --launch --serve-args "$serve" --label "$config-r$rate" \
        --workload multi-turn --conversations "$CONVERSATIONS" --turns "$TURNS" --system-len "$SYSTEM_LEN" \
        --user-len "$USER_LEN" --output-len "$OUTPUT_LEN" --request-rate "$rate" --max-seconds "$MAX_SECONDS" \
        --seed "$SEED" --results "$RESULTS" --no-progress 2>&1 | tee -a "$LOG"; then
      echo "=== $config, $rate requests/s FAILED (see $LOG)" | tee -a "$LOG"
      status=1
    fi
    echo "=== $config, $rate requests/s took $((SECONDS - start)) s" | tee -a "$LOG"
  done
done
echo "results: $RESULTS ($(wc -l <"$RESULTS" 2>/dev/null || echo 0) records); log: $LOG"
exit $status
