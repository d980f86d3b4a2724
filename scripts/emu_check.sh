#!/usr/bin/env bash
# Runs the CUDA kernels' own source on the CPU: each test in tests/emu compiles a kernel header from
# csrc/cuda with a host C++20 compiler against the emulator tests/emu/cuemu.h, launches it as the .cu
# host wrapper does and compares every output with a port of the CPU op. No GPU and no torch needed;
# the CUDA headers (cuda_fp16.h & co.) come from a CUDA toolkit.
#
#   bash scripts/emu_check.sh [OP ...]     OP: topk_marginals build_tree tree_attention accept_tree compact_kv
#                                          paged_tree_attention paged_compact_kv, or cuemu (the emulator's
#                                          self-test); default: all eight
# Every test runs under the default schedule and under each seeded random warp schedule in EMU_SEEDS
# (default "5 9"). Exits non-zero if any build or run fails.
#   EMU_SANITIZE=1   build with AddressSanitizer + UndefinedBehaviorSanitizer (several times slower)
#   EMU_CSRC=DIR     test the kernel headers under DIR/cuda instead of csrc/cuda (mutation runs)
#   EMU_BUILD_DIR    where the test binaries go (default build/emu, or build/emu-san)
#   EMU_JOBS         tests built and run at once (default: the number of CPUs)
#   EMU_TIMEOUT      seconds one test run may take before it counts as failed (default 600)
#   EMU_FAIL_FAST=1  stop an op's schedules at its first failure
#   CXX, CUDA_HOME   the compiler (default g++) and the CUDA toolkit (default: the one of the nvcc on PATH,
#                    else /usr/local/cuda)
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
ALL_OPS="cuemu topk_marginals build_tree tree_attention accept_tree compact_kv paged_tree_attention paged_compact_kv"
OPS=${*:-$ALL_OPS}
for op in $OPS; do
  case " $ALL_OPS " in *" $op "*) ;; *) echo "emu_check: unknown op '$op' (ops: $ALL_OPS)" >&2; exit 2 ;; esac
done

# The CUDA headers: $CUDA_HOME, else the toolkit of the nvcc on PATH, else /usr/local/cuda.
if [ -z "${CUDA_HOME:-}" ]; then
  nvcc_path=$(readlink -f "$(command -v nvcc || echo /nonexistent/bin/nvcc)")
  for c in "$(dirname "$(dirname "$nvcc_path")")" /usr/local/cuda; do
    if [ -f "$c/include/crt/host_defines.h" ]; then CUDA_HOME=$c; break; fi
  done
fi
if [ ! -f "${CUDA_HOME:-/nonexistent}/include/cuda_fp16.h" ] || [ ! -f "$CUDA_HOME/include/crt/host_defines.h" ]; then
  echo "emu_check: no CUDA toolkit headers found (cuda_fp16.h, crt/host_defines.h); set CUDA_HOME" >&2
  exit 2
fi
CXX=${CXX:-g++}
CSRC=$(cd "${EMU_CSRC:-csrc}" && pwd)
SEEDS=${EMU_SEEDS-5 9}
JOBS=${EMU_JOBS:-$(nproc)}
TIMEOUT=${EMU_TIMEOUT:-600}
FLAGS=(-std=c++20 -fno-strict-aliasing -ffp-contract=off -Wall -Wno-unknown-pragmas -Werror
       -I "$ROOT/tests/emu" -I "$CSRC" -isystem "$CUDA_HOME/include")
if [ -n "${EMU_SANITIZE:-}" ]; then
  FLAGS+=(-O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=all)
  BUILD=${EMU_BUILD_DIR:-build/emu-san}
  export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0:abort_on_error=1}
  export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1}
else
  FLAGS+=(-O2)
  BUILD=${EMU_BUILD_DIR:-build/emu}
fi
mkdir -p "$BUILD"
BUILD=$(cd "$BUILD" && pwd)

# Builds one op's test and runs it under every schedule; output to $BUILD/<op>.log, status to <op>.rc.
run_schedule() {
  local op=$1 s=$2 r
  echo "--- $op: schedule $s"
  if [ "$s" = default ]; then
    env -u CUEMU_SEED timeout "$TIMEOUT" "$BUILD/test_$op"
  else
    CUEMU_SEED=$s timeout "$TIMEOUT" "$BUILD/test_$op"
  fi
  r=$?
  [ $r -eq 124 ] && echo "timed out after ${TIMEOUT}s"
  [ $r -eq 0 ] || echo "FAIL $op (schedule $s, exit status $r)"
  return $r
}
check_op() {
  local op=$1 rc=0 t0 s
  t0=$(date +%s)
  {
    echo "--- $op: build"
    if "$CXX" "${FLAGS[@]}" "tests/emu/test_$op.cpp" -o "$BUILD/test_$op"; then
      for s in default $SEEDS; do
        run_schedule "$op" "$s" || rc=1
        if [ $rc -ne 0 ] && [ -n "${EMU_FAIL_FAST:-}" ]; then break; fi
      done
    else
      echo "FAIL $op: build"
      rc=1
    fi
    echo "--- $op: $([ $rc -eq 0 ] && echo ok || echo FAILED) in $(( $(date +%s) - t0 ))s"
  } >"$BUILD/$op.log" 2>&1
  echo $rc >"$BUILD/$op.rc"
}

start=$(date +%s)
echo "emu_check: ops [$OPS], schedules [default $SEEDS]${EMU_SANITIZE:+, ASan+UBSan}," \
  "kernels from $CSRC/cuda, $JOBS at a time"
running=0
for op in $OPS; do
  rm -f "$BUILD/$op.rc" "$BUILD/test_$op"
  check_op "$op" &
  running=$((running + 1))
  if [ "$running" -ge "$JOBS" ]; then wait -n; running=$((running - 1)); fi
done
wait
failed=()
for op in $OPS; do
  cat "$BUILD/$op.log"
  [ "$(cat "$BUILD/$op.rc" 2>/dev/null)" = 0 ] || failed+=("$op")
done
echo "emu_check: $(( $(date +%s) - start ))s wall;" \
  "${#failed[@]} of $(wc -w <<<"$OPS") ops failed${failed:+: ${failed[*]}}"
[ ${#failed[@]} -eq 0 ]
