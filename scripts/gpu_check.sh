#!/usr/bin/env bash
# Everything that needs a GPU, in one device call (see DEVELOPERS.md "The GPU"):
#   build on the device -> GPU tests -> compute-sanitizer memcheck on the kernel tests -> benchmarks.
# Full logs and JSON go under $OUT (or ./out); a short summary is printed last.
# Usage on the device machine, from the repo root:   bash scripts/gpu_check.sh [quick]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"9.0a"}
summary=()
run() {  # name, command...
  local name=$1; shift
  local t0=$SECONDS
  if "$@" >"$OUT/$name.log" 2>&1; then r=ok; else r="FAIL($?)"; fi
  summary+=("$(printf '%-22s %-8s %4ss' "$name" "$r" $((SECONDS - t0)))")
  tail -n 5 "$OUT/$name.log"
}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee "$OUT/device.txt"
git rev-parse HEAD 2>/dev/null | tee -a "$OUT/device.txt"
# Reuse a carried build (.carry/_C*.so built on an identical device image) when present.
if ls .carry/_C*.so >/dev/null 2>&1; then cp .carry/_C*.so python/ddtree/; else
  run build env JOBS=16 scripts/dev_build.sh build/gpu
  mkdir -p "$OUT" && cp build/gpu/_C*.so "$OUT/" 2>/dev/null
fi
export PYTHONPATH=$PWD/python
python3 -c "import ddtree, json; print(json.dumps(ddtree.info()))" | tee -a "$OUT/device.txt"
run gpu_tests python3 -m pytest -q -m gpu tests/test_cuda_tree.py tests/test_cuda_verify.py tests/test_fast_target.py tests/test_hf_attention.py tests/test_decode.py
run cpu_tests python3 -m pytest -q tests -m "not slow" -x --deselect tests/test_sampling.py
if [ "${1:-}" != quick ]; then
  run sanitizer compute-sanitizer --tool memcheck --error-exitcode 1 python3 -m pytest -q -x \
    tests/test_cuda_tree.py tests/test_cuda_verify.py -k "not graph and not large"
  run bench_tree python3 bench/bench_tree.py --out "$OUT/bench_tree.json"
  run bench_attention python3 bench/bench_attention.py --out "$OUT/bench_attention.json"
  run bench_verify python3 bench/bench_e2e.py --verify-only --out "$OUT/verify"
  run bench_e2e python3 bench/bench_e2e.py --out "$OUT/e2e"
  run ckpt_8b python3 bench/make_checkpoint.py --out /tmp/qwen3-8b-shape
  run profile_8b python3 -m ddtree profile --target /tmp/qwen3-8b-shape --device cuda --dtype bfloat16 \
    --max-nodes 512 --contexts 128,1024,2048,4096,8192 --repeats 10 --out "$OUT/qwen3_8b_cost.json"
fi
echo; echo "=== summary ($(cat "$OUT/device.txt" | head -1))"; printf '%s\n' "${summary[@]}"
