"""Random inputs for the op tests: logits of several kinds, cost tables, trees, caches.

Every generator takes a ``torch.Generator`` so that a failing case is reproduced by its seed.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parent / "data"

LOGIT_KINDS = ("normal", "ties", "nonfinite")


def make_logits(B: int, D: int, V: int, dtype: torch.dtype, kind: str, gen: torch.Generator) -> torch.Tensor:
    """``[B, D, V]`` logits in ``dtype``.

    normal: N(0, 3^2). ties: a few integer values, so that many log-probs are equal and the tie rule
    decides. nonfinite: normal values with scattered NaN/+inf/-inf, plus (when there are enough rows)
    a row of only -inf, a row of only NaN, a row with several +inf and a row mixing -inf and NaN.
    """
    if kind == "normal":
        x = torch.randn(B, D, V, generator=gen) * 3
    elif kind == "ties":
        x = torch.randint(-3, 2, (B, D, V), generator=gen).float()
    elif kind == "nonfinite":
        x = torch.randn(B, D, V, generator=gen) * 3
        u = torch.rand(B, D, V, generator=gen)
        x[u < 0.05] = float("nan")
        x[(u >= 0.05) & (u < 0.10)] = float("-inf")
        x[(u >= 0.10) & (u < 0.11)] = float("inf")
        rows = x.view(B * D, V)
        special = [float("-inf"), float("nan")]
        for r in range(min(len(special), rows.shape[0])):
            rows[r] = special[r]
        if rows.shape[0] > 2:
            rows[2] = torch.randn(V, generator=gen)
            rows[2, torch.randperm(V, generator=gen)[: max(1, V // 3)]] = float("inf")
        if rows.shape[0] > 3:
            rows[3] = float("-inf")
            rows[3, ::2] = float("nan")
    else:
        raise ValueError(kind)
    return x.to(dtype)


def convex_cost(B: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """``[B, n]`` f32 verify-cost tables ``a + b i + c i^2``: positive, increasing, convex."""
    i = torch.arange(n, dtype=torch.float64)
    a = 0.5 + torch.rand(B, 1, generator=gen, dtype=torch.float64)
    b = 0.05 * torch.rand(B, 1, generator=gen, dtype=torch.float64)
    c = 0.002 * torch.rand(B, 1, generator=gen, dtype=torch.float64)
    return (a + b * i + c * i * i).float()


def concave_cost(B: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """``[B, n]`` f32 verify-cost tables shaped like a CPU's fp32 verify: a step from one row to a few (a
    small-M matrix product's extra cost), then slopes that fall before they grow again. Increasing, not
    convex: theta can fall and rise again along the best-first order."""
    i = torch.arange(n, dtype=torch.float64)
    a = 0.2 + 0.3 * torch.rand(B, 1, generator=gen, dtype=torch.float64)
    step = a * (0.5 + 2 * torch.rand(B, 1, generator=gen, dtype=torch.float64))
    knee = 1.0 + 8.0 * torch.rand(B, 1, generator=gen, dtype=torch.float64)
    late = 0.02 * torch.rand(B, 1, generator=gen, dtype=torch.float64)
    return (a + step * torch.minimum(i, knee) / knee + late * i).float()


def random_cost(B: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """``[B, n]`` f32 positive costs with no shape at all (not monotone, not convex)."""
    return 0.01 + torch.rand(B, n, generator=gen)


def a800_curves() -> dict:
    """The CaDDTree A800 verification-cost curves kept in tests/data (see the file's "source")."""
    return json.loads((DATA / "caddtree_cost_curves_a800_subset.json").read_text())


def a800_cost(B: int, n: int, gen: torch.Generator) -> tuple[torch.Tensor, float]:
    """``[B, n]`` f32 cost tables, each row a real A800 curve (random model and context), and the
    drafter cost. ``n`` must be at most 513 (the curves cover 0..512 nodes)."""
    curves = a800_curves()["models"]
    rows = []
    draft = None
    for _ in range(B):
        model = sorted(curves)[int(torch.randint(len(curves), (1,), generator=gen))]
        ctxs = sorted(curves[model]["verify_cost"], key=int)
        ctx = ctxs[int(torch.randint(len(ctxs), (1,), generator=gen))]
        rows.append(curves[model]["verify_cost"][ctx][:n])
        draft = curves[model]["draft_cost"]
    return torch.tensor(rows, dtype=torch.float32), float(draft)


def context_lens(B: int, high: int, gen: torch.Generator, include_zero: bool = True) -> torch.Tensor:
    """``[B]`` i64 ragged context lengths in ``[0, high]``; the first is 0 when ``include_zero``."""
    ctx = torch.randint(0, high + 1, (B,), generator=gen)
    if include_zero:
        ctx[0] = 0
    return ctx


def seed_of(*args) -> int:
    """A seed that depends only on the arguments' text (Python's hash() is randomised per process)."""
    import zlib

    return zlib.crc32(repr(args).encode())
