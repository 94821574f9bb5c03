#!/usr/bin/env bash
# A worker group on several GPUs, measured (the multi-GPU run): a colocated worker that is a group of EP ranks
# (one per device of DEVICES) serving PRESET with dummy weights in the quantized layout, then
#   1. `sparsepd serve` starts it: every rank's memory plan goes to $OUT/serve.log; one `generate` is served;
#   2. `sparsepd loadtest` against it: single stream and SWEEP streams, INPUT_LEN in / OUTPUT_LEN out
#      ($OUT/loadtest_group.jsonl and the tables in $OUT/group_2gpu.log);
#   3. serve stopped (SIGTERM, exit code logged);
#   4. correctness on the GPUs: bench/bench_group.py --check on the `bench` preset (the group's logits and greedy
#      tokens against the whole model on one GPU) and the GPU suite's group tests;
#   5. the engine benchmark of the group: decode steps at BATCHES with the all-to-all's share and the weight floor
#      (bench/bench_group.py on BENCH_PRESET).
# Run from the repository root:  OUT=/some/dir bench/group_2gpu.sh      (DEVICES=cuda:0 EP=1 checks it on one GPU;
# DEVICES=cpu EP=1 PRESET=tiny BENCH_PRESET=tiny LOAD_FORMAT=auto ... on the CPU, where the timings mean nothing)
set -uo pipefail
cd "$(dirname "$0")/.."

: "${OUT:?set OUT to the folder the results go to}"
PYTHON=${PYTHON:-python3}
DEVICES=${DEVICES:-cuda:0,cuda:1}
EP=${EP:-2}
PRESET=${PRESET:-v4-flash}
LOAD_FORMAT=${LOAD_FORMAT:-dummy}
SERVE_EXTRA=${SERVE_EXTRA:-"--num-slots 256 --max-batch-tokens 8192"}
SWEEP=${SWEEP:-1,8,64,256}
INPUT_LEN=${INPUT_LEN:-4096}
OUTPUT_LEN=${OUTPUT_LEN:-256}
MAX_SECONDS=${MAX_SECONDS:-30}
DRAIN_SECONDS=${DRAIN_SECONDS:-30}
BENCH_PRESET=${BENCH_PRESET:-bench}
BATCHES=${BATCHES:-1,64,256}
CONTEXT=${CONTEXT:-4096}
START_TIMEOUT=${START_TIMEOUT:-540}
STEPS=${STEPS:-all}   # which of serve,bench,tests to run
LOG=$OUT/group_2gpu.log
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}  # NVLink multicast off
if [ -z "${SPARSEPD_GIT_COMMIT:-}" ] && commit=$(git rev-parse HEAD 2>/dev/null); then
  export SPARSEPD_GIT_COMMIT=$commit
fi
echo "=== $(date -u +%FT%TZ) commit ${SPARSEPD_GIT_COMMIT:-?} devices $DEVICES ep $EP" | tee -a "$LOG"
status=0

if [[ $STEPS == all || $STEPS == *serve* ]]; then
  serve_log=$OUT/serve.log
  "$PYTHON" -m sparsepd serve --colocated --decode 1 --devices "$DEVICES" --ep "$EP" --preset "$PRESET" \
      --load-format "$LOAD_FORMAT" --port 0 --metrics-port 0 --child-logs --start-timeout "$START_TIMEOUT" \
      $SERVE_EXTRA >"$OUT/serve.out" 2>"$serve_log" &
  serve_pid=$!
  for _ in $(seq "$START_TIMEOUT"); do
    grep -q '^READY ' "$OUT/serve.out" 2>/dev/null && break
    kill -0 "$serve_pid" 2>/dev/null || break
    sleep 1
  done
  ready=$(grep -m1 '^READY ' "$OUT/serve.out" || true)
  if [ -z "$ready" ]; then
    echo "error: serve did not become ready; its last lines:" | tee -a "$LOG"
    tail -40 "$serve_log" | tee -a "$LOG"
    kill "$serve_pid" 2>/dev/null; wait "$serve_pid"
    status=1
  else
    router=$("$PYTHON" -c 'import json, sys; print(json.loads(sys.argv[1][6:])["grpc"])' "$ready")
    echo "serve ready: $ready" | tee -a "$LOG"
    grep -E "rank|weights|KV pools|memory" "$serve_log" | grep -E "weights|KV pools|model " | tee -a "$LOG"
    "$PYTHON" -m sparsepd generate "The group serves" --router "$router" --max-new-tokens 16 2>&1 | tail -5 | tee -a "$LOG"
    "$PYTHON" -m sparsepd loadtest --router "$router" --label "group-ep$EP" --sweep "$SWEEP" \
        --input-len "$INPUT_LEN" --output-len "$OUTPUT_LEN" --max-seconds "$MAX_SECONDS" \
        --drain-seconds "$DRAIN_SECONDS" --warmup-requests 2 --no-progress \
        --results "$OUT/loadtest_group.jsonl" 2>&1 | tee -a "$LOG" || status=1
    kill -TERM "$serve_pid"
    wait "$serve_pid"; code=$?
    echo "serve exited with code $code" | tee -a "$LOG"
    [ "$code" = 0 ] || status=1
  fi
fi

if [[ $STEPS == all || $STEPS == *tests* ]]; then
  echo "--- the group's correctness ($BENCH_PRESET, $CONTEXT-token contexts) and the GPU group tests" | tee -a "$LOG"
  "$PYTHON" -P bench/bench_group.py --devices "$DEVICES" --ep "$EP" --preset "$BENCH_PRESET" --check \
      --batches 1 --steps 3 --context "$CONTEXT" --out "$OUT/check" 2>&1 | grep -v '^\[rank' | tee -a "$LOG" || status=1
  SPARSEPD_TEST_GPU=1 "$PYTHON" -m pytest tests/gpu/test_group_gpu.py -q 2>&1 | tail -5 | tee -a "$LOG" || status=1
fi

if [[ $STEPS == all || $STEPS == *bench* ]]; then
  echo "--- the group's decode steps ($BENCH_PRESET)" | tee -a "$LOG"
  plain=()
  [ "$EP" = 1 ] && plain=(--compare-plain)
  "$PYTHON" -P bench/bench_group.py --devices "$DEVICES" --ep "$EP" --preset "$BENCH_PRESET" "${plain[@]}" \
      --batches "$BATCHES" --context "$CONTEXT" --out "$OUT/bench" 2>&1 | grep -v '^\[rank' | tee -a "$LOG" || status=1
fi
exit $status
