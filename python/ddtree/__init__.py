"""ddtree: speculative decoding with diffusion draft trees.

The ops are ``torch.ops.ddtree.*`` (typed wrappers in :mod:`ddtree.ops`); :func:`info` says how the
installed extension was built.
"""
from __future__ import annotations

from pathlib import Path

import torch


def _torch_mismatch(built: str, running: str) -> ImportError:
    return ImportError(
        f"ddtree's extension was built against torch {built}, but this Python has torch {running}. A "
        f"compiled extension only loads under the torch it was built with. Fix: install that torch "
        f"(pip install torch=={built.split('+')[0]}, from the index that provides the {built} build), or rebuild "
        f"ddtree against this one (pip install --no-build-isolation --force-reinstall --no-deps <ddtree source>)."
    )


def _load_extension():
    """Import ``_C``, first checking that the running torch is the one it was compiled against (a different
    torch would fail with a missing-library or missing-symbol error that names neither version)."""
    here = Path(__file__).resolve().parent
    if not any(here.glob("_C*.so")) and not any(here.glob("_C*.pyd")):
        # A source checkout's python/ddtree without a build (e.g. python/ on PYTHONPATH with ddtree installed from
        # a wheel): Python would say "partially initialized module (most likely due to a circular import)".
        raise ImportError(
            f"{here} is ddtree's source tree without its compiled extension (no _C*.so in it). Either build it in "
            f"place (bash scripts/dev_build.sh; DDTREE_CUDA=OFF for CPU kernels only), or use an installed ddtree "
            f"(pip install a wheel from scripts/build_wheels.sh, or pip install --no-build-isolation .) and take "
            f"this folder off sys.path / PYTHONPATH.")
    try:
        from ._build_info import TORCH_VERSION as built  # written by the build; absent in odd dev setups
    except ImportError:
        built = None
    if built and built != torch.__version__:
        raise _torch_mismatch(built, torch.__version__)
    try:
        from . import _C
    except ImportError as e:
        raise ImportError(f"ddtree's compiled extension failed to load under torch {torch.__version__} ({e}). "
                          "If torch changed since ddtree was built, rebuild ddtree against this torch.") from e
    if _C.torch_version and _C.torch_version != torch.__version__:
        raise _torch_mismatch(_C.torch_version, torch.__version__)
    return _C


_C = _load_extension()

from .ops import (  # noqa: E402
    DraftTree,
    accept_tree,
    build_tree,
    compact_kv,
    paged_compact_kv,
    paged_tree_attention,
    topk_marginals,
    tree_attention,
)

__version__ = _C.__version__

__all__ = [
    "DraftTree",
    "accept_tree",
    "build_tree",
    "compact_kv",
    "info",
    "paged_compact_kv",
    "paged_tree_attention",
    "topk_marginals",
    "tree_attention",
]


def info() -> dict:
    """Version and build facts: the torch it was built against, whether CUDA kernels are compiled in, and
    for which archs."""
    return {
        "version": __version__,
        "cuda_kernels": bool(_C.with_cuda),
        "cuda_archs": [a for a in _C.cuda_archs.split(",") if a],
        "torch": torch.__version__,
        "torch_built": _C.torch_version,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
    }
