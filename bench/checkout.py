"""Which ddtree a benchmark imports: the checkout's own ``python/`` only when it holds a built extension.

A benchmark run from a checkout used to put ``python/`` first on ``sys.path`` unconditionally, so with ddtree
installed from a wheel and no developer build in the checkout it imported a source tree without ``_C`` and failed.
Now an installed ddtree is used unless the checkout has been built (``scripts/dev_build.sh`` copies ``_C*.so``
into ``python/ddtree/``); ``PYTHONPATH=python`` still forces the checkout, as before.
"""
from __future__ import annotations

import sys
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "python"


def checkout_is_built(root: Path = PACKAGE_ROOT) -> bool:
    return any((root / "ddtree").glob("_C*.so")) or any((root / "ddtree").glob("_C*.pyd"))


def use_checkout_if_built(root: Path = PACKAGE_ROOT) -> bool:
    """Put the checkout's package first on ``sys.path`` if it is built; say whether it did."""
    if checkout_is_built(root) and str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return checkout_is_built(root)
