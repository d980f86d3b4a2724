#!/usr/bin/env bash
# Everything that needs a GPU, in stages that each fit one call on a rented GPU machine.
#
#   bash scripts/gpu_check.sh [STAGE ...]      (default: build tests)
#
#   build     build the extension (sm_90a) unless .carry/_C*.so is present; the .so goes to $OUT for reuse
#   tests     pytest -m gpu over tests/ (every CUDA kernel test, graph capture, fast runner, decode bf16)
#   sanitize  compute-sanitizer memcheck + racecheck on a small set of kernel tests
#   bench     bench/bench_tree.py and bench/bench_attention.py
#   verify    bench/bench_e2e.py --verify-only
#   e2e       bench/bench_e2e.py, the full run with plots
#   profile   a random Qwen3-8B-shaped checkpoint in a scratch folder, then `ddtree profile` on it
#   vllm      tests/vllm_plugin (the vLLM plugin in real engines) when vLLM 0.32 is installed on the machine
#
# Every stage has its own time limit, so a slow one cannot eat the call. $OUT receives summary.txt,
# results.tgz (all logs, JSON and plots) and the built _C*.so: three files (a device call returns at most 8).
# The summary is printed last; the exit code is the number of failed stages.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
WORK=$(mktemp -d)/gpu_check; mkdir -p "$WORK" "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"9.0a"} PYTHONPATH=$PWD/python
SANITIZER=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
stages=("$@"); [ ${#stages[@]} -eq 0 ] && stages=(build tests)
summary=(); failed=0

run() {  # name, time limit (s), command...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS r
  if timeout "$limit" "$@" >"$WORK/$name.log" 2>&1; then r=ok; else r="FAIL($?)"; failed=$((failed + 1)); fi
  summary+=("$(printf '%-12s %-9s %4ss' "$name" "$r" $((SECONDS - t0)))")
  echo "--- $name: $r"; tail -n 15 "$WORK/$name.log"
}

{ nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader; git rev-parse HEAD 2>/dev/null; } \
  | tee "$WORK/device.txt"

for stage in "${stages[@]}"; do
  case $stage in
    build)
      if ls .carry/_C*.so >/dev/null 2>&1; then cp .carry/_C*.so python/ddtree/ && summary+=("build        carried")
      else
        run build 400 env JOBS=16 bash scripts/dev_build.sh build/gpu
        cp build/gpu/_C*.so "$OUT/" 2>/dev/null
      fi
      python3 -c "import ddtree, json; print(json.dumps(ddtree.info()))" | tee -a "$WORK/device.txt"
      # Without a visible GPU and compiled kernels every later test would skip and "pass": fail here instead.
      run cuda_ready 60 python3 -c "import torch, ddtree, sys; sys.exit(not (torch.cuda.is_available() and ddtree.info()['cuda_kernels']))" ;;
    tests)
      run tests 420 python3 -m pytest -q -m gpu tests -p no:cacheprovider --durations=15 ;;
    sanitize)
      sel=(tests/test_cuda_tree.py tests/test_cuda_verify.py tests/test_paged.py
           -k "special_values or global_scratch or clamps or strided or misaligned or aliasing or mixed_dtypes")
      run memcheck 240 "$SANITIZER" --tool memcheck --error-exitcode 1 python3 -m pytest -q -x -p no:cacheprovider "${sel[@]}"
      run racecheck 240 "$SANITIZER" --tool racecheck --error-exitcode 1 python3 -m pytest -q -x -p no:cacheprovider "${sel[@]}" ;;
    bench)
      run bench_tree 200 python3 bench/bench_tree.py --out "$WORK/bench_tree.json"
      run bench_attention 200 python3 bench/bench_attention.py --out "$WORK/bench_attention.json" ;;
    verify)
      run verify 300 python3 bench/bench_e2e.py --verify-only --out "$WORK/verify" ;;
    e2e)
      run e2e 540 python3 bench/bench_e2e.py --out "$WORK/e2e" ;;
    profile)
      run ckpt_8b 200 python3 bench/make_checkpoint.py --out "$(dirname "$WORK")/qwen3-8b-shape"
      run profile_8b 360 python3 -m ddtree profile --target "$(dirname "$WORK")/qwen3-8b-shape" --device cuda --dtype bfloat16 \
        --max-nodes 512 --contexts 128,1024,2048,4096,8192 --repeats 10 --out "$WORK/qwen3_8b_cost.json" ;;
    vllm)
      if python3 -c "import vllm, sys; sys.exit(not vllm.__version__.startswith('0.32.'))" 2>/dev/null; then
        run vllm 540 python3 -m pytest -q tests/vllm_plugin -p no:cacheprovider
      else
        summary+=("vllm         skipped (no vLLM 0.32 on this machine)")
      fi ;;
    *) echo "unknown stage $stage"; failed=$((failed + 1)) ;;
  esac
done

printf '%s\n' "=== summary ($(head -1 "$WORK/device.txt"))" "${summary[@]}" | tee "$WORK/summary.txt"
cp "$WORK/summary.txt" "$OUT/"
tar -czf "$OUT/results.tgz" -C "$(dirname "$WORK")" gpu_check
exit "$failed"
