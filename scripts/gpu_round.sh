#!/usr/bin/env bash
# One whole GPU round on the device machine, in one call (fits in ~9.5 minutes):
#
#   info   nvidia-smi -L, nvidia-smi topo -m, environment and versions      -> $OUT/env.txt
#   build  python3 -m pip install --no-build-isolation --no-deps -v .       -> $OUT/build.log
#          (reuses ./build when it was carried; then probes the installed package and native backend)
#   tests  python3 -m pytest -m gpu -q --timeout 300 tests                  -> $OUT/tests.log
#          (on one GPU too: grouped-GEMM kernels, native ep=1, and the multi-rank cases with
#          N processes sharing one GPU as N ranks)
#   sanitize  bash scripts/sanitize.sh (only with SANITIZE=1; ~8 min)       -> $OUT/sanitize.log
#          (compute-sanitizer memcheck/racecheck/synccheck over the native kernels at ep 1, 2, 4)
#   bench  python3 -m jax_moe_dispatch.bench, one suite after another       -> $OUT/bench_<suite>.{log,csv}
#          (BENCH_SUITES, default "gemm moe dispatch": grouped GEMMs, the MoE layer, dispatch/combine
#          at every ep size the GPUs allow), under what is left of the time budget
#
# A failed stage skips the later ones (KEEP_GOING=1 runs them anyway). The last lines
# printed are always a stage | status | seconds table, then each suite's results table.
#
# Usage (repository root):  bash scripts/gpu_round.sh
# Environment:
#   SKIP_BUILD=1 SKIP_TESTS=1 SKIP_BENCH=1   skip a stage (SKIP_BUILD runs the source tree via PYTHONPATH)
#   BENCH_SUITES="gemm moe dispatch"         suites to run, in order
#   BENCH_ARGS="..."    appended to every bench command line (later flags win), e.g. "--reps 3"
#   TEST_ARGS="..."     appended to the pytest command line
#   ROUND_BUDGET_S=570  seconds for the whole script; the bench gets what is left
#   KEEP_GOING=1        run later stages after a failed one
#   SANITIZE=1          run the sanitize stage (SANITIZE_* variables: see scripts/sanitize.sh)
#   OUT=dir             where logs and results go (default ./bench_out); at most 8 files come back
#
# NVLink multicast must stay off on these machines: the variables below are exported
# defensively, and nothing here changes GPU settings.
set -u -o pipefail
export NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
export PYTHONUNBUFFERED=1

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 2
OUT_DIR=${OUT:-$REPO/bench_out}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
# Tests and bench run from a neutral directory so that `python3 -m` imports the
# installed package (with its native library), not the source tree.
RUN_DIR=$(mktemp -d /tmp/jmd_round.XXXXXX)
ROUND_BUDGET_S=${ROUND_BUDGET_S:-570}
PY=${PYTHON:-python3}
ROUND_START=$SECONDS

NAMES=() STATUSES=() TIMES=()
FAILED=""
NATIVE_LINE="native: not probed"
DEVICE_LINE="device: unknown"

remaining() { echo $((ROUND_BUDGET_S - (SECONDS - ROUND_START))); }

record() {  # name status seconds
  NAMES+=("$1") STATUSES+=("$2") TIMES+=("$3")
  echo "===== [$1] $2 (${3}s; $(( SECONDS - ROUND_START ))s into the round)"
}

run_stage() {  # name skip_var function
  local name=$1 skip=$2 fn=$3
  if [[ -n ${!skip:-} && ${!skip} != 0 ]]; then record "$name" "SKIP($skip)" 0; return 0; fi
  if [[ -n $FAILED && -z ${KEEP_GOING:-} ]]; then record "$name" "SKIP($FAILED failed)" 0; return 0; fi
  echo "===== [$name] start ($(( SECONDS - ROUND_START ))s into the round, $(remaining)s left)"
  local t0=$SECONDS status
  STAGE_STATUS=""
  "$fn"
  local rc=$?
  status=${STAGE_STATUS:-$([[ $rc == 0 ]] && echo OK || echo "FAIL(rc=$rc)")}
  [[ $rc == 124 || $rc == 137 ]] && status="TIMEOUT(rc=$rc)"
  [[ $status == OK* || $status == NO* ]] || FAILED=${FAILED:-$name}
  record "$name" "$status" $(( SECONDS - t0 ))
}

stage_info() {
  {
    echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "repo: $REPO ($(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo no-git)" \
         "$(git -C "$REPO" status --porcelain 2>/dev/null | wc -l) changed paths)"
    echo "--- nvidia-smi -L"; nvidia-smi -L
    echo "--- nvidia-smi topo -m"; nvidia-smi topo -m
    echo "--- environment"
    env | grep -E '^(NCCL_|NVSHMEM_|TORCH_SYMM|XLA_|JAX_|CUDA|TORCH_CUDA_ARCH|PYTHONUNBUFFERED)' | sort
    echo "--- versions"
    "$PY" --version
    "$PY" -c 'import jax, jaxlib, numpy; print("jax", jax.__version__, "jaxlib", jaxlib.__version__, "numpy", numpy.__version__); print(jax.devices())'
    nvcc --version 2>/dev/null | tail -n 2
  } 2>&1 | tee "$OUT_DIR/env.txt"
  local rc=$?
  [[ $NCCL_NVLS_ENABLE == 0 ]] || { echo "NCCL_NVLS_ENABLE is not 0"; return 3; }
  local n
  n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
  DEVICE_LINE="device: ${n} x $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)"
  return $rc
}

probe_package() {
  (cd "$RUN_DIR" && "$PY" - <<'EOF'
import jax, jax_moe_dispatch
print("package:", jax_moe_dispatch.__file__)
try:
    from jax_moe_dispatch.backends import native
    ok = native.native_available()
    why = "" if ok else getattr(native, "native_unavailable_reason", lambda: "")()
    print("native: available" if ok else f"native: UNAVAILABLE ({why})")
except Exception as e:
    print(f"native: not importable ({type(e).__name__}: {e})")
EOF
  ) 2>&1 | tee -a "$OUT_DIR/build.log" | tail -n 2 > "$RUN_DIR/probe.txt"
  cat "$RUN_DIR/probe.txt"
  NATIVE_LINE=$(grep '^native:' "$RUN_DIR/probe.txt" || echo "native: probe failed (see build.log)")
}

stage_build() {
  local args=() rc
  if [[ -d $REPO/build ]]; then
    args+=("-Cbuild-dir=build/{wheel_tag}")
    echo "reusing the carried build directory ./build"
  fi
  ( cd "$REPO" && "$PY" -m pip install --no-build-isolation --no-deps -v "${args[@]}" . ) \
      > "$OUT_DIR/build.log" 2>&1
  rc=$?
  if [[ $rc != 0 && ${#args[@]} -gt 0 ]] && grep -q 'CMakeCache' "$OUT_DIR/build.log"; then
    echo "carried ./build does not fit this machine (CMakeCache); building in a fresh directory"
    mv "$OUT_DIR/build.log" "$RUN_DIR/build.first.log"
    ( cd "$REPO" && "$PY" -m pip install --no-build-isolation --no-deps -v \
        "-Cbuild-dir=$RUN_DIR/build" . ) > "$OUT_DIR/build.log" 2>&1
    rc=$?
  fi
  if [[ $rc != 0 ]]; then
    echo "--- build failed (rc=$rc); last lines of build.log:"
    tail -n 60 "$OUT_DIR/build.log"
    return $rc
  fi
  grep -E 'Successfully installed|warning' "$OUT_DIR/build.log" | tail -n 5
  probe_package
  return 0
}

stage_tests() {
  local left=$(( $(remaining) - ${BENCH_RESERVE_S:-200} )) rc
  (( left < 60 )) && left=60
  local per_test=(--timeout 300)
  if ! "$PY" -c 'import pytest_timeout' 2>/dev/null; then
    per_test=(); echo "pytest-timeout is not installed: no per-test timeout"
  fi
  echo "pytest hard limit ${left}s"
  # shellcheck disable=SC2086
  ( cd "$RUN_DIR" && timeout -k 10 "$left" "$PY" -m pytest -m gpu -q "${per_test[@]}" \
      -p no:cacheprovider --rootdir "$REPO" "$REPO/tests" ${TEST_ARGS:-} ) 2>&1 | tee "$OUT_DIR/tests.log"
  rc=$?
  if [[ $rc == 5 ]]; then STAGE_STATUS="NO TESTS(-m gpu)"; return 0; fi
  return $rc
}

stage_sanitize() {
  local left=$(( $(remaining) - ${BENCH_RESERVE_S:-200} ))
  (( left > 480 )) && left=480
  (( left < 60 )) && { echo "only ${left}s left for the sanitizer"; return 4; }
  # Its per-run logs stay on the machine (at most 8 files come back); the log has the table
  # and the sanitizer's report lines of every run that found something.
  OUT="$RUN_DIR/sanitize_out" SANITIZE_BUDGET_S=${SANITIZE_BUDGET_S:-$left} PYTHON="$PY" \
      bash "$REPO/scripts/sanitize.sh" > "$OUT_DIR/sanitize.log" 2>&1
  local rc=$?
  tail -n 40 "$OUT_DIR/sanitize.log"
  return $rc
}

stage_bench() {
  local n eps left rc suites=(${BENCH_SUITES:-gemm moe dispatch}) i=0 status=0
  n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
  if (( n >= 8 )); then eps=2,4,8; elif (( n >= 4 )); then eps=2,4; elif (( n >= 2 )); then eps=2; else eps=1; fi
  for suite in "${suites[@]}"; do
    left=$(( $(remaining) - 15 ))
    # Each suite gets an equal share of what is left (the last one all of it).
    local share=$(( left / (${#suites[@]} - i) )) soft
    i=$((i + 1))
    soft=$(( share - 45 ))
    if (( soft < 30 )); then echo "only ${left}s left: suite $suite skipped"; status=4; continue; fi
    local extra=()
    case $suite in
      dispatch) extra=(--ep "$eps" --hidden-sweep 7168,4096,2048 --num-sms 24) ;;
      moe) extra=(--ep "1${eps:+,$eps}") ; [[ $eps == 1 ]] && extra=(--ep 1) ;;
    esac
    echo "bench $suite: soft budget ${soft}s, hard limit ${share}s"
    # shellcheck disable=SC2086
    ( cd "$RUN_DIR" && timeout -s INT -k 15 "$share" "$PY" -m jax_moe_dispatch.bench --suite "$suite" \
        "${extra[@]}" --csv "$OUT_DIR/bench_$suite.csv" --time-budget "$soft" ${BENCH_ARGS:-} ) 2>&1 \
        | tee "$OUT_DIR/bench_$suite.log"
    rc=$?
    [[ $rc != 0 ]] && status=$rc
  done
  [[ $status == 1 ]] && STAGE_STATUS="FAIL(correctness/error: see bench_*.log)"
  return $status
}

if [[ -n ${SKIP_BUILD:-} && $SKIP_BUILD != 0 ]]; then
  export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
fi

run_stage info SKIP_INFO stage_info
run_stage build SKIP_BUILD stage_build
if [[ -n ${SKIP_BUILD:-} && $SKIP_BUILD != 0 ]]; then probe_package > /dev/null; fi
run_stage tests SKIP_TESTS stage_tests
if [[ ${SANITIZE:-0} == 1 ]]; then
  run_stage sanitize SKIP_SANITIZE stage_sanitize
else
  record sanitize "SKIP(SANITIZE unset)" 0
fi
run_stage bench SKIP_BENCH stage_bench

{
  echo
  echo "===== SUMMARY ($(date -u '+%Y-%m-%d %H:%M:%S UTC'), $(( SECONDS - ROUND_START ))s) ====="
  printf '%-6s %-40s %7s\n' stage status seconds
  for i in "${!NAMES[@]}"; do
    printf '%-6s %-40s %7s\n' "${NAMES[$i]}" "${STATUSES[$i]}" "${TIMES[$i]}"
  done
  echo "$DEVICE_LINE"
  echo "$NATIVE_LINE"
  if [[ -f $OUT_DIR/tests.log ]]; then echo "tests: $(grep -v '^\s*$' "$OUT_DIR/tests.log" | tail -n 1)"; fi
  echo "files: $(cd "$OUT_DIR" && ls | tr '\n' ' ')"
  for log in "$OUT_DIR"/bench_*.log; do
    [[ -f $log ]] || continue
    echo "===== BENCHMARK $(basename "$log" .log) ====="
    if grep -q '^==== RESULTS ====' "$log"; then
      sed -n '/^==== RESULTS ====/,/^==== END RESULTS ====/p' "$log" | sed '1d;$d' | grep -vE '^(date|device|jax|command):'
    else
      echo "(the suite did not finish; last lines:)"; tail -n 8 "$log"
    fi
  done
} | tee "$OUT_DIR/summary.txt"
rm -rf "$RUN_DIR"
[[ -z $FAILED ]]
