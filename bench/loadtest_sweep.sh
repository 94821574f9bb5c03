#!/usr/bin/env bash
# GPU load-test sweep of the `bench` preset: prefill/decode disaggregated (1 prefill + 1 decode worker, sharing
# one GPU or a GPU each: PD_DEVICES) against colocated (workers that prefill and decode in one engine, one per
# device in COLOCATED_DEVICES: the same GPU count), each a
# `sparsepd loadtest --launch` concurrency sweep with random 2K-8K-token prompts and 256 output tokens.
# Writes one JSONL record per point, labelled "pd" and "colocated", to $OUT/loadtest_bench.jsonl and the
# terminal tables to $OUT/loadtest_sweep.log. No plots here (the GPU image has no matplotlib); draw them
# where matplotlib is installed:
#     sparsepd loadtest --plot-only $OUT/loadtest_bench.jsonl --label pd --label colocated
#
# Run from the repository root:  OUT=/some/dir bench/loadtest_sweep.sh
# About 8 minutes with the defaults: 2 configurations x 8 points, each point sends requests for at most
# MAX_SECONDS and then gives those in flight DRAIN_SECONDS to finish (the rest are recorded as cut), plus
# two server starts. Every knob below can be overridden from the environment.
set -euo pipefail
cd "$(dirname "$0")/.."

: "${OUT:?set OUT to the folder the results go to}"
PYTHON=${PYTHON:-python3}
SWEEP=${SWEEP:-1,2,4,8,16,32,64,128}
INPUT_LEN=${INPUT_LEN:-2048-8192}
OUTPUT_LEN=${OUTPUT_LEN:-256}
MAX_SECONDS=${MAX_SECONDS:-10}        # per point: no request starts after this
DRAIN_SECONDS=${DRAIN_SECONDS:-15}    # per point: then in-flight requests get this long
NUM_PROMPTS=${NUM_PROMPTS:-}          # per point; empty = the tool's default, max(16, 4 x concurrency)
WARMUP_REQUESTS=${WARMUP_REQUESTS:-4} # before the first point (Triton compiles on first use)
SEED=${SEED:-0}
DEVICE=${DEVICE:-cuda:0}
PD_DEVICES=${PD_DEVICES:-$DEVICE,$DEVICE}        # decode worker first, then prefill (cuda:0,cuda:1 = a GPU each)
COLOCATED_DEVICES=${COLOCATED_DEVICES:-$DEVICE}  # one colocated worker per device listed
SERVE_COMMON=${SERVE_COMMON:-"--preset bench --num-slots 128 --max-batch-tokens 8192"}
CONFIGS=${CONFIGS:-"pd colocated"}
RESULTS=${RESULTS:-$OUT/loadtest_bench.jsonl}
LOG=${LOG:-$OUT/loadtest_sweep.log}

if ! "$PYTHON" -c "import sparsepd.loadtest, sparsepd.router" 2>/dev/null; then
  echo "error: $PYTHON cannot import sparsepd.loadtest; install the checkout first: $PYTHON -m pip install -e . --no-deps" >&2
  exit 2
fi
mkdir -p "$OUT"
# where the checkout has no .git, pass SPARSEPD_GIT_COMMIT to record the commit in every record
if [ -z "${SPARSEPD_GIT_COMMIT:-}" ] && commit=$(git rev-parse HEAD 2>/dev/null); then
  export SPARSEPD_GIT_COMMIT=$commit
fi

extra=()
[ -n "$NUM_PROMPTS" ] && extra+=(--num-prompts "$NUM_PROMPTS")
status=0
for config in $CONFIGS; do
  case $config in
    pd) serve="$SERVE_COMMON --prefill 1 --decode 1 --devices $PD_DEVICES" ;;
    colocated) n=$(tr ',' '\n' <<<"$COLOCATED_DEVICES" | grep -c .)
               serve="$SERVE_COMMON --colocated --decode $n --devices $COLOCATED_DEVICES" ;;
    *) echo "error: unknown configuration '$config' in CONFIGS (pd, colocated)" >&2; exit 2 ;;
  esac
  echo "=== $config: sparsepd serve $serve ($(date -u +%FT%TZ))" | tee -a "$LOG"
  start=$SECONDS
  if ! "$PYTHON" -m sparsepd loadtest --launch --serve-args "$serve" --label "$config" \
      --sweep "$SWEEP" --input-len "$INPUT_LEN" --output-len "$OUTPUT_LEN" \
      --max-seconds "$MAX_SECONDS" --drain-seconds "$DRAIN_SECONDS" --warmup-requests "$WARMUP_REQUESTS" \
      --seed "$SEED" --results "$RESULTS" --no-progress "${extra[@]}" 2>&1 | tee -a "$LOG"; then
    echo "=== $config FAILED (see $LOG)" | tee -a "$LOG"
    status=1
  fi
  echo "=== $config took $((SECONDS - start)) s" | tee -a "$LOG"
done
echo "results: $RESULTS ($(wc -l <"$RESULTS" 2>/dev/null || echo 0) records); log: $LOG"
exit $status
