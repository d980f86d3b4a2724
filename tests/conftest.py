"""Shared test setup: the installed package, the `gpu` marker, the hypothesis profile.

Tests import ``ddtree`` as installed (CI runs them against the wheel with ``--import-mode=importlib``),
and the helper modules of this folder (``reference``, ``inputs``) by name, so this folder goes on
``sys.path`` here: importlib mode does not put it there.
"""
from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

import ddtree  # noqa: E402,F401  (fails loudly here if the extension does not load)

# Kernels run on CPU here and the references are slow Python: no per-example deadline, and few
# examples by default so that the whole suite stays within minutes on two cores.
settings.register_profile("ddtree", deadline=None, max_examples=25, print_blob=True)
settings.register_profile("thorough", deadline=None, max_examples=500, print_blob=True)
settings.load_profile(os.environ.get("DDTREE_HYPOTHESIS_PROFILE", "ddtree"))

HAS_CUDA = torch.cuda.is_available() and bool(ddtree.info()["cuda_kernels"])

gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device and the CUDA kernels")


def devices() -> list:
    """The devices to run the op tests on: CPU always, CUDA when there is one (as pytest params)."""
    return ["cpu", pytest.param("cuda", marks=[gpu, pytest.mark.gpu])]
