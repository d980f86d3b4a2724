"""Non-decreasing curves over the node budget: the least-squares fit and its evaluation.

A verification-cost curve ``Cv(n)`` for one context length is kept as its values at a grid of node
counts ``n_0 < n_1 < ... < n_{G-1}`` and read as the piecewise-linear function through them. That
function is non-decreasing exactly when its values are, which is what :func:`fit_monotone` enforces (as
bounds, so the constraint holds exactly, not as a penalty). Nothing asks for convexity: CaDDTree
(``build_tree``) keeps the first maximiser of ``theta(n) = (1 + phi(n)) / (Cd + Cv(n))`` over every
``n``, so a curve that is concave at small ``n`` (a CPU's fp32 verify: the first few extra rows cost the
most) is priced as measured instead of by its best convex approximation.

Pure numpy/scipy, float64 throughout; costs are in milliseconds by convention but nothing here cares.
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import lsq_linear


def _as_grid(n) -> np.ndarray:
    grid = np.asarray(n, dtype=np.float64)
    if grid.ndim != 1 or grid.size == 0:
        raise ValueError(f"node grid must be a non-empty 1-D sequence, got shape {grid.shape}")
    if not np.all(np.isfinite(grid)) or np.any(np.diff(grid) <= 0):
        raise ValueError("node grid must be finite and strictly increasing")
    return grid


def fit_monotone(n, y, weights=None) -> np.ndarray:
    """Least-squares non-decreasing fit of samples ``y`` taken at grid points ``n``.

    n: ``[G]`` strictly increasing node counts; y: ``[G]`` measured costs (e.g. median ms);
    weights: optional ``[G]`` non-negative weights (e.g. ``1 / iqr``). Returns the fitted values at the
    grid points, ``[G]`` float64.

    Reparametrisation (increments): ``c(n_j) = a + sum_{k=1..j} e_k`` where ``a = c(n_0)`` is free and
    ``e_k`` the rise from ``n_{k-1}`` to ``n_k``. Non-decreasing <=> ``e >= 0``: a bounded linear
    least-squares problem (isotonic regression), solved by ``scipy.optimize.lsq_linear`` (BVLS). The
    values are then rebuilt by cumulative sums of non-negative terms, so they are non-decreasing in float64
    too. Not convex on purpose: a CPU's verify cost rises steeply over the first few rows and then slowly.
    """
    grid = _as_grid(n)
    y = np.asarray(y, dtype=np.float64)
    if y.shape != grid.shape:
        raise ValueError(f"samples shape {y.shape} must match the node grid shape {grid.shape}")
    if not np.all(np.isfinite(y)):
        raise ValueError("samples must be finite")
    G = grid.size
    if G == 1:
        return y.copy()
    A = np.tril(np.ones((G, G)))  # A[j, 0] = 1; A[j, k] = 1 for 1 <= k <= j
    if weights is not None:
        w = np.sqrt(np.asarray(weights, dtype=np.float64))
        if w.shape != grid.shape or not np.all(np.isfinite(w)):
            raise ValueError("weights must be finite, non-negative and match the node grid")
        A, y = A * w[:, None], y * w
    lower = np.r_[-np.inf, np.zeros(G - 1)]
    res = lsq_linear(A, y, bounds=(lower, np.full(G, np.inf)), method="bvls")
    a, e = res.x[0], np.maximum(res.x[1:], 0.0)
    return np.r_[a, a + np.cumsum(e)]


def check_monotone(n, values, rtol: float = 1e-9) -> None:
    """Raise ``ValueError`` unless ``values [G]`` at grid ``n [G]`` are finite and non-decreasing.

    ``rtol`` (relative to the largest |value|) absorbs float64 rounding of values written to JSON.
    """
    grid = _as_grid(n)
    v = np.asarray(values, dtype=np.float64)
    if v.shape != grid.shape or not np.all(np.isfinite(v)):
        raise ValueError(f"curve values must be finite with shape {grid.shape}, got {v.shape}")
    if grid.size < 2:
        return
    tol = rtol * max(1.0, float(np.abs(v).max()))
    if np.any(np.diff(v) < -tol):
        j = int(np.argmin(np.diff(v))) + 1
        raise ValueError(f"cost curve is decreasing at n = {grid[j]:g}")


def eval_curves(n_grid, values, n) -> np.ndarray:
    """Evaluate piecewise-linear curves through ``(n_grid, values)`` at node counts ``n``.

    n_grid: ``[G]``; values: ``[..., G]`` (one curve per leading index, sharing the grid); n: ``[M]``.
    Returns ``[..., M]`` float64. Below ``n_grid[0]`` a curve is flat; past ``n_grid[-1]`` it continues
    with its last slope. Both keep a non-decreasing curve non-decreasing everywhere.
    The result is linear in ``values``, so interpolating curves and evaluating them commute.
    """
    grid = np.asarray(n_grid, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    x = np.asarray(n, dtype=np.float64)
    if grid.size == 1:
        return np.broadcast_to(v[..., :1], v.shape[:-1] + x.shape).copy()
    j = np.clip(np.searchsorted(grid, x, side="right") - 1, 0, grid.size - 2)  # left knot of x's segment
    t = np.maximum((x - grid[j]) / (grid[j + 1] - grid[j]), 0.0)  # t > 1 past the last knot: extrapolate
    return v[..., j] + (v[..., j + 1] - v[..., j]) * t
