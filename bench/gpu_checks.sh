#!/usr/bin/env bash
# GPU checks and benchmarks in one device call, each step's log under $OUT (default ./gpu-out), a summary last.
#   bench/gpu_checks.sh STEP...   steps: suite, engine, trace (where a decode step's time goes: host phases, GPU gaps,
#   a chrome trace per batch), engine-q (dummy FP8/FP4 weights), flash (V4-Flash
#   dimensions, dummy quantized weights, FLASH_LAYERS layers), service, quant, quant-tests, attn (sparse attention
#   on FP8 and bf16 rows, the issue's target shapes; attn-full: every shape; attn-sweep: the target shapes' launch
#   variants, FP8 rows unless ATTN_ROWS says otherwise), indexer, compressor (HCA decode's
#   window split), kernel-tests, spec (speculative decoding: oracle drafts on bench, the default model's MTP
#   drafts; spec-old: oracle drafts at batch 1 against .old/, as engine-old), prefix (the radix cache's multi-turn load test; prefix-host: the host tier in one engine),
#   service-cost (the service path's CPU per output token on bench, 128 in / $SERVICE_OUT (512) out at $SERVICE_CONC (32,128) streams; the workers wait for a step's tokens with
#   --gpu-wait $GPU_WAIT, spin unless set, and $SERVE_EXTRA, e.g. --prefill-cuda-graph; service-cost-block: the same
#   with block, its own log, to time both in one call; service-cost-pg: with --prefill-cuda-graph, its own log), group (a worker group of one against the plain worker), tests (the GPU tests of $TESTS: paths or node ids)
# Run from the repository root after installing the package (the wheels' prefix in the README's GPU section).
# To keep one invocation under 10 minutes, its steps' limits (the defaults below) should add up to ≤ ~560 s.
# Invocations in order of priority (the suite took 110 s on an H200 on 2026-12-06 and 236 s on an H100 on
# 2026-12-07): (1) SUITE_S=265 ENGINE_S=120 SERVICE_S=140 SERVICE_CONC=128 ... suite engine service-cost-pg [525];
# (2) TRACE_BATCHES=128,256 ... trace prefix (CONFIGS="cache nocache" RATES=8, PREFIX_S=270), then service-cost-pg
# again with SERVE_EXTRA="--stream-interval 4" and its own OUT [~500]; (3) spec service-cost [480]; (4) kernel-tests
# attn-sweep indexer compressor quant [530]; (5) engine-q prefix-host group [360]; (6) flash service. A failed
# test's traceback is in the suite's tests-failures.txt.
set -uo pipefail
out=${OUT:-gpu-out}
mkdir -p "$out"
summary=()
step() {  # step NAME TIMEOUT_S COMMAND...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "=== $name (limit ${limit}s): $*" >&2
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  summary+=("$name rc=$rc $((SECONDS - t0))s: $(grep -E 'passed|failed|error' "$out/$name.log" | tail -n 1)")
}
for s in "$@"; do
  case $s in
    suite) step suite ${SUITE_S:-290} env SPARSEPD_TEST_LOG="$out/tests" scripts/test-gpu -n 16 --tb=short ;;
    engine) step engine ${ENGINE_S:-150} python3 -P bench/bench_engine.py --batches ${ENGINE_BATCHES:-1,8,32,64,128,256} --steps 10 --profile-prefill 15 --profile-batch ${PROFILE_BATCH:-256} ;;
    trace) step trace ${TRACE_S:-90} python3 -P bench/step_trace.py --batches ${TRACE_BATCHES:-64,128,256} --out "$out" ;;
    engine-q) step engine-q ${ENGINEQ_S:-120} python3 -P bench/bench_engine.py --load-format dummy --batches 1,8,32,64,128,256 --steps 10 ;;
    flash)  # as many layers as fit: ~3.7 GB a V4-Flash layer (FP4 experts), ~14 GB for the rest (36 on an H200's
            # 150 GB, 19 on an H100's 85 GB; 36 ran out of memory on an H100); FLASH_LAYERS overrides
      gb=$(( $(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -n 1) * 1048576 / 1000000000 ))
      layers=${FLASH_LAYERS:-$(( (gb - 14) * 10 / 37 > 43 ? 43 : (gb - 14) * 10 / 37 ))}
      step flash ${FLASH_S:-240} python3 -P bench/bench_engine.py --preset v4-flash --load-format dummy \
             --num-layers "$layers" --batches 1,8,64,256 --context 4096 --steps 5 ;;
    attn) step attn ${ATTN_S:-90} python3 -P bench/bench_sparse_attention.py --quick --rows both --out "$out" ;;
    attn-sweep) step attn-sweep ${ATTN_S:-120} python3 -P bench/bench_sparse_attention.py --quick --rows ${ATTN_ROWS:-fp8} --sweep \
                  --budget-s ${ATTN_BUDGET_S:-90} --json "$out/attn_sweep.json" ;;
    attn-full) step attn-full ${ATTN_S:-120} python3 -P bench/bench_sparse_attention.py --rows both --json "$out/attn.json" ;;
    indexer) step indexer ${INDEXER_S:-90} python3 -P bench/bench_indexer.py --quick --out "$out/indexer.md" ;;
    compressor) step compressor ${COMPRESSOR_S:-60} python3 -P bench/bench_compressor.py --out "$out/compressor.md" ;;
    kernel-tests) step kernel-tests ${KTESTS_S:-120} scripts/test-gpu -n 8 tests/kernels/test_sparse_attention.py \
                    tests/kernels/test_kv_rows.py tests/kernels/test_compressor.py tests/kernels/test_fp8_gemm.py \
                    tests/kernels/test_moe.py ;;
    spec) step spec ${SPEC_S:-240} sh -c "python3 -P bench/bench_spec.py oracle --graphs on --json '$out/spec_oracle.json' &&
            python3 -P bench/bench_spec.py mtp --device cuda ${SPEC_MTP_GRAPHS---graphs} --json '$out/spec_mtp.json'" ;;
    prefix-host) step prefix-host ${PREFIX_S:-90} python3 -P bench/prefix_host_tier.py --preset bench --device cuda \
                   --conversations 32 --turns 3 --system-len 1024 --user-len 256 --output-len 16 --batch 8 \
                   --json "$out/prefix_host_tier.json" ;;
    prefix) step prefix ${PREFIX_S:-300} env OUT="$out" bench/prefix_multiturn.sh ;;
    service-cost|service-cost-block|service-cost-pg)  # the worker's CPU per token with the host spinning or sleeping
      # on a step's tokens; -pg: prompt chunks replayed from CUDA graphs (--prefill-cuda-graph)
      wait=${GPU_WAIT:-spin}; [ "$s" = service-cost-block ] && wait=block
      extra=${SERVE_EXTRA:-}; [ "$s" = service-cost-pg ] && extra="$extra --prefill-cuda-graph"
      step "$s" ${SERVICE_S:-180} python3 -P bench/bench_service.py \
        --serve-args "--preset bench --colocated --num-slots 128 --gpu-wait $wait $extra" --concurrency ${SERVICE_CONC:-32,128} --input-len 128 \
        --output-len ${SERVICE_OUT:-512} ;;
    group) step group ${GROUP_S:-150} python3 -P bench/bench_group.py --devices cuda:0 --ep 1 --compare-plain \
             --batches 1,64,256 --exchange ${GROUP_EXCHANGE:-auto,reference} --out "$out" ;;
    quant) step quant ${QUANT_S:-170} python3 -P bench/bench_quant.py "$out/quant.json" --sweep --budget-s ${QUANT_BUDGET_S:-110} \
             ${QUANT_ONLY:+--only "$QUANT_ONLY"} ;;
    service) step service 240 env PYTHONSAFEPATH=1 OUT="$out" LOG="$out/service_sweep.log" CONFIGS=colocated SWEEP=128 \
               INPUT_LEN=128 OUTPUT_LEN=512 MAX_SECONDS=20 DRAIN_SECONDS=40 NUM_PROMPTS=256 bench/loadtest_sweep.sh ;;
    engine-old)  # the same benchmark against the engine of .old/ (a `git archive` of an earlier commit), same card
      python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site_old ./.old >/dev/null 2>&1
      step engine-old 240 env PYTHONPATH="/tmp/site_old:$PYTHONPATH" python3 -P .old/bench/bench_engine_new.py \
        --batches ${OLD_BATCHES:-1,64,128,256} --steps 10 ;;
    spec-old)  # the oracle speculative benchmark at batch 1 here and against .old/ (`git archive` of an earlier
               # commit), same card, back to back
      python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site_old ./.old >/dev/null 2>&1
      step spec-new ${SPEC_S:-90} python3 -P bench/bench_spec.py oracle --accept 0,0.8,1.0 --graphs on --batches 1 \
        --json "$out/spec_new.json"
      step spec-old ${SPEC_S:-90} env PYTHONPATH="/tmp/site_old:$PYTHONPATH" python3 -P .old/bench/bench_spec.py oracle \
        --accept 0,0.8,1.0 --graphs on --batches 1 --json "$out/spec_old.json" ;;
    tests) step tests ${TESTS_S:-120} scripts/test-gpu -n 8 ${TESTS:?tests: set TESTS to the test paths} ;;
    quant-tests) step quant-tests ${QTESTS_S:-240} scripts/test-gpu -n 16 tests/kernels/test_fp8_gemm.py tests/kernels/test_moe.py tests/kernels/test_rope_norm.py tests/gpu ;;
    *) echo "unknown step $s" >&2 ;;
  esac
done
per_test=$(ls "$out"/tests.* 2>/dev/null | grep -v -e '\.failures$' -e '\.log$')  # not the tests step's own log
if [ -n "$per_test" ]; then  # the suite's per-test logs, merged: slowest tests, every failure
  echo "$per_test" | xargs cat | sort -rn >"$out/tests-by-seconds.txt"
  cat "$out"/tests.*.failures >"$out/tests-failures.txt" 2>/dev/null
  echo "$per_test" | xargs rm -f
  rm -f "$out"/tests.*.failures
  echo "--- the suite's 25 slowest tests"; head -n 25 "$out/tests-by-seconds.txt"
  echo "--- failures"; grep '^=====' "$out/tests-failures.txt" || echo none
fi
for f in "$out"/*.log; do echo "--- tail of $f"; tail -n 30 "$f"; done
printf '%s\n' "${summary[@]}"
