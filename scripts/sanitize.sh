#!/usr/bin/env bash
# compute-sanitizer over the native backend's kernels, on the GPU machine (about 8 minutes):
#
#   tools  memcheck, racecheck, synccheck                     (SANITIZE_TOOLS)
#   cases  ep1  gpu-marked ep=1 native tests in one process (SANITIZE_EP1_TESTS, picked by
#               SANITIZE_EP1_K): the fused HybridEP ops in bf16, float32 and FP8 (pad
#               None/16/128, drops), their gradients and summation order, and handler calls
#               with bad attributes (refused); the local permute/unpermute kernels
#               (moe_permute_fusion). (The plain ops' tests need 2+ GPUs; on one GPU the
#               plain kernels run in the ep2/ep4 cases.)
#          ep2  tests/multirank/worker.py as 2 processes (2 ranks) under launch_ranks.py,
#               each rank run under the sanitizer
#          ep4  the same with 4 ranks                          (SANITIZE_CASES)
#
# The worker runs small cases (SANITIZE_WORKER_CASES, default: a bf16 dispatch + combine,
# one with dropped rows, the fused HybridEP ops, the dispatcher with moe_permute_fusion, and
# ranks running different ops, which also exercises the abort, reset and recovery path).
# Every kernel of the process is checked, XLA's included (SANITIZE_FILTER, e.g.
# "--kernel-name kns=jmd", narrows that).
# XLA allocates with the platform allocator here (XLA_PYTHON_CLIENT_ALLOCATOR=platform),
# one cudaMalloc per buffer, so that memcheck sees an access past a buffer instead of into
# XLA's pool, and compiles on one thread (see XLA_FLAGS below).
#
# Prints a table tool x case -> errors found (FAIL: the run itself failed, e.g. a test or
# a timeout; SKIP: no time left) and exits nonzero unless every run ended with 0 errors.
# Logs go to $OUT/sanitize (default ./bench_out/sanitize).
#
# Usage (repository root, package installed):  bash scripts/sanitize.sh
# Environment:
#   SANITIZE_TOOLS="memcheck racecheck synccheck"   SANITIZE_CASES="ep1 ep2 ep4"
#   SANITIZE_WORKER_CASES=dispatch_combine_bf16,drop,hybrid_fused,permute_fusion,mismatch_ops
#   SANITIZE_EP1_TESTS="tests/test_native.py tests/test_native_hybrid.py tests/test_native_permute.py"
#   SANITIZE_EP1_K=... (pytest -k)
#   SANITIZE_FILTER=""                              SANITIZE_BUDGET_S=480 (all runs)
#   SANITIZE_RUN_S=150 (one run at most)            COMPUTE_SANITIZER=path  PYTHON=python3
set -u -o pipefail
export NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_ALLOCATOR=platform XLA_PYTHON_CLIENT_PREALLOCATE=false
# XLA compiles on one thread: with parallel compilation, compute-sanitizer 2025.3.1 crashed
# the target process (SIGSEGV inside the tool, any tool, erratically) on the H200.
export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_gpu_force_compilation_parallelism=1"

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT_DIR=${OUT:-$REPO/bench_out}/sanitize
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
PY=${PYTHON:-python3}
read -r -a TOOLS <<< "${SANITIZE_TOOLS:-memcheck racecheck synccheck}"
read -r -a CASES <<< "${SANITIZE_CASES:-ep1 ep2 ep4}"
WORKER_CASES=${SANITIZE_WORKER_CASES:-dispatch_combine_bf16,drop,hybrid_fused,permute_fusion,mismatch_ops}
read -r -a EP1_TESTS <<< "${SANITIZE_EP1_TESTS:-tests/test_native.py tests/test_native_hybrid.py tests/test_native_permute.py}"
EP1_K=${SANITIZE_EP1_K:-"refuse_bad_attributes or (ep1 and (gradients or summation_order or (hybrid_bitwise and (random-N or one_expert-None-16)))) or (test_permute_bitwise and 16-bfloat16) or test_gradients_numeric or test_dispatcher_fusion_bitwise"}
read -r -a FILTER <<< "${SANITIZE_FILTER:-}"
BUDGET=${SANITIZE_BUDGET_S:-480}
RUN_S=${SANITIZE_RUN_S:-150}
START=$SECONDS

SAN=${COMPUTE_SANITIZER:-$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)}
if [[ ! -x $SAN ]]; then
  echo "compute-sanitizer not found (set COMPUTE_SANITIZER=/path/to/compute-sanitizer)"
  exit 2
fi
GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
(( GPUS >= 1 )) || { echo "no GPU visible (nvidia-smi -L)"; exit 2; }
# Tests run from a neutral directory so that the installed package (with its extension) is used.
RUN_DIR=$(mktemp -d /tmp/jmd_sanitize.XXXXXX)
trap 'rm -rf "$RUN_DIR"' EXIT

gpus_for() {  # ranks -> the most GPUs (at most one per rank) that split them evenly
  local n=$1 g=$GPUS
  (( g > n )) && g=$n
  while (( n % g )); do g=$((g - 1)); done
  echo "$g"
}

# Errors the sanitizer reported in the files given ("" when none printed a summary):
# memcheck/synccheck "ERROR SUMMARY: N errors", racecheck "(N errors, M warnings)" (both count).
errors_in() {
  local total="" n
  for n in $(cat "$@" 2>/dev/null | sed -n \
      -e 's/.*ERROR SUMMARY: \([0-9][0-9]*\) error.*/\1/p' \
      -e 's/.*RACECHECK SUMMARY: .*(\([0-9][0-9]*\) errors*, \([0-9][0-9]*\) warning.*/\1 \2/p'); do
    total=$(( ${total:-0} + n ))
  done
  echo "$total"
}

run_one() {  # tool case -> prints the table cell
  local tool=$1 kase=$2 dir="$OUT_DIR/${tool}_$2" left rc errors
  rm -rf "$dir"; mkdir -p "$dir"
  left=$(( BUDGET - (SECONDS - START) ))
  (( left > RUN_S )) && left=$RUN_S
  if (( left < 20 )); then echo "SKIP"; return; fi
  local san=("$SAN" --tool "$tool" "${FILTER[@]}" --error-exitcode 9)
  case $kase in
    ep1)
      ( cd "$RUN_DIR" && timeout -k 10 "$left" "${san[@]}" "$PY" -m pytest -m gpu -q -p no:cacheprovider \
          --rootdir "$REPO" "${EP1_TESTS[@]/#/$REPO/}" -k "$EP1_K" ) > "$dir/rank0.log" 2>&1
      rc=$?
      # A skipped test checked nothing.
      [[ $rc == 0 ]] && ! grep -qE '[0-9]+ passed' "$dir/rank0.log" && rc=5 ;;
    ep*)
      local n=${kase#ep}
      ( cd "$RUN_DIR" && "$PY" "$REPO/scripts/launch_ranks.py" -n "$n" --gpus "$(gpus_for "$n")" \
          --timeout "$left" --log-dir "$dir" -- "${san[@]}" "$PY" "$REPO/tests/multirank/worker.py" \
          --impl native --out "$dir" --cases "$WORKER_CASES" --timeout 120 --short-timeout 20 ) \
          > "$dir/launcher.log" 2>&1
      rc=$? ;;
  esac
  errors=$(errors_in "$dir"/rank*.log)
  if [[ -n $errors && $errors != 0 ]]; then echo "$errors"
  elif [[ $rc != 0 ]]; then echo "FAIL(rc=$rc)"
  elif [[ -z $errors ]]; then echo "FAIL(no summary)"
  else echo "0"
  fi
}

declare -A CELL
status=0
for tool in "${TOOLS[@]}"; do
  for kase in "${CASES[@]}"; do
    t0=$SECONDS
    CELL[$tool,$kase]=$(run_one "$tool" "$kase")
    echo "== $tool $kase: ${CELL[$tool,$kase]} ($(( SECONDS - t0 ))s; logs in $OUT_DIR/${tool}_$kase)"
    if [[ ${CELL[$tool,$kase]} != 0 ]]; then
      status=1
      # The sanitizer's own report lines if there are any, else the end of each log.
      for log in "$OUT_DIR/${tool}_$kase"/*.log; do
        [[ -f $log ]] || continue
        echo "--- $log"
        grep '^=========' "$log" | grep -v '^========= COMPUTE-SANITIZER$' | head -n 30
        tail -n 15 "$log"
      done
    fi
  done
done

{
  echo
  echo "===== compute-sanitizer: errors found ($(( SECONDS - START ))s, $GPUS GPU(s), filter: ${FILTER[*]:-none}) ====="
  printf '%-10s' tool; printf ' %-14s' "${CASES[@]}"; echo
  for tool in "${TOOLS[@]}"; do
    printf '%-10s' "$tool"
    for kase in "${CASES[@]}"; do printf ' %-14s' "${CELL[$tool,$kase]}"; done
    echo
  done
} | tee "$OUT_DIR/summary.txt"
exit $status
