#!/usr/bin/env bash
# One command from a fresh clone to the demo: create .venv, install torch and the build tools, build and
# install ddtree (CUDA kernels too when nvcc is present), then run `ddtree demo` on the embedded default.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1

# Long quiet steps say what they do and about how long they take, then every 30 s that they still run.
TICKER=
step() {
  stop_ticker
  echo "==> $* ($(date +%T))"
  (t0=$SECONDS; while sleep 30 >/dev/null 2>&1; do echo "    ... still working ($((SECONDS - t0)) s)"; done) &
  TICKER=$!
}
stop_ticker() { if [ -n "$TICKER" ]; then kill "$TICKER" 2>/dev/null || true; TICKER=; fi; }
trap stop_ticker EXIT

step "installing torch and the build tools into .venv (first time: about 1.5 min and 6 GB; then seconds)"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q torch "scikit-build-core>=1.1" "pybind11>=2.12" "cmake>=3.26" ninja numpy
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"8.0;9.0a"}
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
if command -v nvcc >/dev/null || [ -x /usr/local/cuda/bin/nvcc ]; then
  step "building ddtree: C++ and CUDA kernels, and installing transformers (about 5.5 min on 2 cores)"
else
  step "building ddtree: C++ kernels (no nvcc: no CUDA kernels), and installing transformers (a few minutes)"
fi
.venv/bin/pip install -q --no-build-isolation .
stop_ticker
echo "==> running ddtree demo (about 30 s on CPU) ($(date +%T))"
exec .venv/bin/ddtree demo "$@"
