"""ddtree: speculative decoding with diffusion draft trees.

The ops are ``torch.ops.ddtree.*`` (typed wrappers in :mod:`ddtree.ops`); :func:`info` says how the
installed extension was built.
"""
from __future__ import annotations

import torch

from . import _C
from .ops import DraftTree, accept_tree, build_tree, compact_kv, topk_marginals, tree_attention

__version__ = _C.__version__

__all__ = [
    "DraftTree",
    "accept_tree",
    "build_tree",
    "compact_kv",
    "info",
    "topk_marginals",
    "tree_attention",
]


def info() -> dict:
    """Version and build facts: whether CUDA kernels are compiled in, and for which archs."""
    return {
        "version": __version__,
        "cuda_kernels": bool(_C.with_cuda),
        "cuda_archs": [a for a in _C.cuda_archs.split(",") if a],
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
    }
