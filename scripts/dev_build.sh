#!/usr/bin/env bash
# Developer build without pip: configure + build the extension in BUILD_DIR (default build/dev) and copy
# _C*.so into python/ddtree/ so that `PYTHONPATH=python python -c "import ddtree"` uses it.
#   DDTREE_CUDA=OFF scripts/dev_build.sh          # CPU kernels only (fast)
#   scripts/dev_build.sh build/cuda               # with the CUDA kernels
#   NO_COPY=1 scripts/dev_build.sh build/cuda     # compile check only, leave python/ddtree alone
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${1:-build/dev}
mkdir -p "$BUILD_DIR"  # also creates the parent that holds $BUILD_DIR.configure.log on a fresh clone
PY=${PYTHON:-python3}
cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DPython_EXECUTABLE="$(command -v "$PY")" \
  -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)" \
  -DDDTREE_CUDA="${DDTREE_CUDA:-ON}" >"$BUILD_DIR.configure.log" 2>&1 || { cat "$BUILD_DIR.configure.log"; exit 1; }
grep "ddtree:" "$BUILD_DIR.configure.log" || true
cmake --build "$BUILD_DIR" -j "${JOBS:-2}"
if [ -z "${NO_COPY:-}" ]; then
  cp "$BUILD_DIR"/_C*.so "$BUILD_DIR"/_build_info.py python/ddtree/
  echo "copied $(ls "$BUILD_DIR"/_C*.so) -> python/ddtree/"
fi
