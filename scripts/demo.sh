#!/usr/bin/env bash
# One command from a fresh clone to the demo: create .venv, install torch and the build tools, build and
# install ddtree (CUDA kernels too when nvcc is present), then run `ddtree demo` on the embedded default.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q torch "scikit-build-core>=0.10" "pybind11>=2.12" "cmake>=3.26" ninja numpy
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"8.0;9.0a"}
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
echo "building ddtree (a few minutes the first time: C++ and CUDA kernels)..."
.venv/bin/pip install -q --no-build-isolation ".[hf]"
exec .venv/bin/ddtree demo "$@"
