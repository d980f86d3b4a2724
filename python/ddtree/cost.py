"""The CaDDTree cost model: drafter cost ``Cd`` and verification cost ``Cv(n; l)``, in milliseconds.

``Cv(n; l)`` is the time of one target verify forward over a tree of ``n`` nodes (``n + 1`` slots with the
root) at context length ``l``; ``Cd`` the time of one drafter round. CaDDTree picks the node budget per
round by maximising ``theta(n) = (1 + phi(n)) / (Cd + Cv(n; l))`` over every ``n`` (see ``build_tree``);
``Cv`` is kept non-decreasing in ``n``, and need not be convex (a CPU's is not: its first few extra rows
cost the most).

* :func:`profile` measures both through the same runner generation uses and fits a :class:`CostModel`.
* :func:`round_overhead_ms` measures what a real round costs beyond its verify (``ddtree demo`` prices
  its tiny pair's rounds with it).
* :meth:`CostModel.default` estimates them from the model's shape and the device's measured bandwidth and
  matrix rate (a roofline), for use without a profile.
* :meth:`CostModel.table` gives ``build_tree`` the float32 table of its ``budget_mode`` on the device:
  ``[B, max_nodes + 1]`` (``"request"``), ``[1, max_nodes + 1]`` (``"batch"``), ``[1, B*max_nodes + 1]``
  (``"ragged"``).
* :meth:`CostModel.save` / :meth:`CostModel.load`: versioned JSON (``"format": "ddtree-cost-model"``;
  version 2 adds the batch curves, version 1 files still load).

Representation: one curve per profiled context ``l_c``, its fitted values at a shared node grid
(piecewise linear between grid points, see :mod:`ddtree.cost_fit`). Across contexts: linear interpolation
between profiled contexts, flat below the first, and past the last the last curve scaled by
``1 + r (l - l_last)`` with ``r >= 0`` the relative growth per token between the last two contexts (a
positive scale keeps it positive and non-decreasing in ``n``).

Batches. ``verify_ms`` is the batch-1 curve (what ``"request"`` mode prices each request by). A profile
with ``batch_sizes = [1, B_1, ...]`` adds the padded curves ``Cv(B_s, n; l)``: one forward over ``B_s``
requests of ``n + 1`` slots each, all at context ``l``. Between profiled batch sizes the cost is linear in
``B``. Past the largest one, ``B_S``, it is the largest curve read at the same total slots plus a cost
per extra row, ``Cv(B, n) = Cv(B_S, B (n + 1) / B_S - 1) + (B - B_S) r(l)``, where ``r >= 0`` is what a
row costs at equal total slots between the last two profiled sizes,
``r = (Cv(B_S, 0) - Cv(B_{S-1}, B_S / B_{S-1} - 1)) / (B_S - B_{S-1})`` (per-request KV reads and
overheads). That is a linear change of ``n`` plus a constant, so still non-decreasing in ``n``, and
exact for a cost ``a + b B + c B (n + 1)``. A model without batch curves (``B_S = 1``: a
version-1 file, :meth:`CostModel.default`) has no ``r``: the batch-1 curve at the same total slots. The
ragged cost of ``B`` roots plus ``t`` nodes in one varlen forward is *modelled, not
measured*: no ddtree runner has a varlen verify, so it is the padded cost at the same total slots,
``Cv_ragged(B, t) = Cv(B, t / B)`` (``B`` rows of ``t / B + 1`` slots). A batch's contexts are priced at
their mean: the profile's ``B`` requests at context ``l`` read ``B l`` KV tokens, a batch with contexts
``l_b`` reads ``sum_b l_b`` (a runner that pads attention to the longest context is underestimated).
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from . import timing
from .cost_fit import check_monotone, eval_curves, fit_monotone
from .timing import device_name, device_rates, median_iqr

FORMAT = "ddtree-cost-model"
VERSION = 2  # 2: batch curves (batch_sizes, batch_verify_ms, batch_draft_ms); 1 still loads
MODES = ("request", "batch", "ragged")

# Drafter cost as a fraction of Cv(0; 0) when nothing better is known: the CaDDTree A800 profiles give
# Cd / Cv(0) = 6.5 ms / 34 ms = 0.19 for the published DFlash drafters of Qwen3-4B/8B.
DRAFT_FRACTION = 0.2
# Fixed per-forward overhead in the roofline default (kernel launches of a graph-captured forward):
# a guess, not a measurement; a profile replaces it.
OVERHEAD_MS = 0.1
OVERHEAD_MS_PER_LAYER = 0.01


def default_node_grid(max_nodes: int) -> list[int]:
    """Node counts to profile: every ``n`` in ``0..16`` (where the curve bends), then four per octave
    (20, 24, 28, 32, 40, 48, ...), ending exactly at ``max_nodes``."""
    if max_nodes < 0:
        raise ValueError(f"max_nodes must be non-negative, got {max_nodes}")
    grid = list(range(min(max_nodes, 16) + 1))
    step = 4
    while grid[-1] < max_nodes:
        nxt = grid[-1] + step
        if nxt >= 2 * step * 4:  # 4 points per octave: step doubles when n doubles
            step *= 2
        grid.append(min(nxt, max_nodes))
    return grid


@dataclass(eq=False)
class CostModel:
    """``Cd`` and ``Cv(n; l)`` in milliseconds.

    node_grid ``[G]`` strictly increasing node counts; contexts ``[C]`` strictly increasing context
    lengths (tokens); verify_ms ``[C, G]`` fitted ``Cv`` at those points, each row non-decreasing;
    draft_cost ``Cd`` (ms). These are batch 1. ``meta`` (device, versions, model identity, how
    it was made) and ``measured`` (raw medians and IQRs of a profile) are carried into the JSON untouched.
    ``bucket`` and ``max_context`` shape :meth:`table`'s cache (runtime settings, not saved).

    Batch curves (optional): batch_sizes ``[S]`` strictly increasing, starting at 1; batch_verify_ms
    ``[S-1, C, G]`` the padded ``Cv(B, n; l)`` for ``batch_sizes[1:]`` (batch 1 is ``verify_ms``), each row
    non-decreasing; batch_draft_ms ``[S-1]`` the drafter round at those batch sizes (``None``:
    ``Cd`` at every batch size). See the module docstring for how other batch sizes are read.

    chain (optional): where an engine verifies a chain (each draft token the child of the one before)
    more cheaply than a tree of as many nodes (vLLM's own causal step, no tree mask), the chain's costs as
    a model of their own: its ``node_grid`` are chain lengths ``k`` (0: no draft), its curves ``Cv(B, k)``
    at the same contexts and batch sizes. CaDDTree's batch mode then weighs the step's tree against the
    best chain (:func:`ddtree.chain_choice.chain_or_tree`). None: chains cost what trees do.
    """

    node_grid: list[int]
    contexts: list[int]
    verify_ms: np.ndarray
    draft_cost: float
    meta: dict = field(default_factory=dict)
    measured: Optional[dict] = None
    bucket: int = 64
    max_context: int = 32768
    batch_sizes: Optional[list[int]] = None
    batch_verify_ms: Optional[np.ndarray] = None
    batch_draft_ms: Optional[list[float]] = None
    chain: Optional["CostModel"] = None
    # (device, N, bucket, buckets, mode, B) -> dense table
    _tables: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        self.node_grid = [int(n) for n in self.node_grid]
        self.contexts = [int(c) for c in self.contexts]
        self.verify_ms = np.asarray(self.verify_ms, dtype=np.float64)
        self.draft_cost = float(self.draft_cost)
        C, G = len(self.contexts), len(self.node_grid)
        if C == 0 or G == 0:
            raise ValueError("cost model needs at least one context and one node count")
        if self.node_grid[0] < 0 or any(b <= a for a, b in zip(self.node_grid, self.node_grid[1:])):
            raise ValueError(f"node_grid must be non-negative and strictly increasing, got {self.node_grid}")
        if self.contexts[0] < 0 or any(b <= a for a, b in zip(self.contexts, self.contexts[1:])):
            raise ValueError(f"contexts must be non-negative and strictly increasing, got {self.contexts}")
        if self.verify_ms.shape != (C, G):
            raise ValueError(f"verify_ms must have shape [contexts, node_grid] = {[C, G]}, got {list(self.verify_ms.shape)}")
        if not np.all(np.isfinite(self.verify_ms)) or np.any(self.verify_ms <= 0):
            raise ValueError("verify_ms must be finite and positive")
        if self.bucket < 1 or self.max_context < 0:
            raise ValueError(f"bucket must be >= 1 and max_context >= 0, got {self.bucket}, {self.max_context}")
        if not (math.isfinite(self.draft_cost) and self.draft_cost >= 0):
            raise ValueError(f"draft_cost must be finite and non-negative, got {self.draft_cost}")
        for c, row in zip(self.contexts, self.verify_ms):
            try:
                check_monotone(self.node_grid, row)
            except ValueError as e:
                raise ValueError(f"verify_ms at context {c}: {e}") from None
        self._check_batches()
        if self.chain is not None:
            if not isinstance(self.chain, CostModel) or self.chain.chain is not None:
                raise ValueError("chain must be a CostModel without a chain of its own")
            if self.chain.contexts != self.contexts or self.chain.batch_sizes != self.batch_sizes:
                raise ValueError(f"chain: its contexts and batch sizes must be the model's ({self.contexts}, "
                                 f"{self.batch_sizes}), got {self.chain.contexts}, {self.chain.batch_sizes}")

    def _check_batches(self) -> None:
        sizes = [1] if self.batch_sizes is None else list(self.batch_sizes)
        if not all(isinstance(b, (int, np.integer)) and not isinstance(b, bool) for b in sizes):
            raise ValueError(f"batch_sizes must be integers, got {sizes}")
        sizes = [int(b) for b in sizes]
        if not sizes or sizes[0] != 1 or any(b <= a for a, b in zip(sizes, sizes[1:])):
            raise ValueError(f"batch_sizes must be positive, strictly increasing and start at 1 (the per-request "
                             f"curve), got {sizes}")
        self.batch_sizes = sizes
        C, G, S = len(self.contexts), len(self.node_grid), len(sizes)
        curves = np.zeros((0, C, G)) if self.batch_verify_ms is None else self.batch_verify_ms
        curves = np.asarray(curves, dtype=np.float64)
        if curves.size == 0 and S == 1:  # JSON writes no curves as []
            curves = curves.reshape(0, C, G)
        if curves.shape != (S - 1, C, G):
            raise ValueError(f"batch_verify_ms must have shape [batch_sizes - 1, contexts, node_grid] = "
                             f"{[S - 1, C, G]}, got {list(curves.shape)}")
        if not np.all(np.isfinite(curves)) or np.any(curves <= 0):
            raise ValueError("batch_verify_ms must be finite and positive")
        for B, per_context in zip(sizes[1:], curves):
            for c, row in zip(self.contexts, per_context):
                try:
                    check_monotone(self.node_grid, row)
                except ValueError as e:
                    raise ValueError(f"batch_verify_ms at batch size {B}, context {c}: {e}") from None
        self.batch_verify_ms = curves
        if self.batch_draft_ms is not None:
            drafts = [float(d) for d in self.batch_draft_ms]
            if len(drafts) != S - 1 or not all(math.isfinite(d) and d >= 0 for d in drafts):
                raise ValueError(f"batch_draft_ms must hold {S - 1} finite non-negative costs (one per batch size "
                                 f"after 1), got {self.batch_draft_ms}")
            self.batch_draft_ms = drafts

    @property
    def has_batch_curves(self) -> bool:
        """Whether padded costs were profiled beyond batch 1 (else batches use the batch-1 fallback)."""
        return len(self.batch_sizes) > 1

    # ---------------------------------------------------------------------------------------------
    # Evaluation

    def _curves_at(self, context_lens: np.ndarray, v: Optional[np.ndarray] = None) -> np.ndarray:
        """``[L]`` contexts -> ``[L, G]`` values at the node grid of the curves ``v [C, G]`` (default
        :attr:`verify_ms`), interpolated in ``l``."""
        ctx = np.asarray(self.contexts, dtype=np.float64)
        v = self.verify_ms if v is None else v
        x = np.asarray(context_lens, dtype=np.float64)
        if len(ctx) == 1:
            return np.repeat(v, len(x), axis=0)
        j = np.clip(np.searchsorted(ctx, x, side="right") - 1, 0, len(ctx) - 2)
        t = np.clip((x - ctx[j]) / (ctx[j + 1] - ctx[j]), 0.0, 1.0)[:, None]
        rows = v[j] * (1 - t) + v[j + 1] * t
        # Past the last context: scale the last curve by 1 + r (l - l_last), r = relative growth per token.
        r = max(0.0, (v[-1].mean() / v[-2].mean() - 1.0) / (ctx[-1] - ctx[-2]))
        past = x > ctx[-1]
        rows[past] = v[-1] * (1.0 + r * (x[past] - ctx[-1]))[:, None]
        return rows

    def verify_cost(self, n, context: float) -> np.ndarray:
        """``Cv(n; context)`` in ms, float64, for node counts ``n`` (int or ``[M]``), one context."""
        return eval_curves(self.node_grid, self._curves_at(np.array([context]))[0], np.atleast_1d(n))

    def _padded(self, batch_size: int, n, contexts) -> np.ndarray:
        """Padded verify cost of ``batch_size`` requests with ``n [M]`` (float) nodes each at each of
        ``contexts [L]``: ``[L, M]`` ms. Linear in ``B`` between profiled sizes; past the largest the
        largest curve at the same total slots plus the per-row cost ``r`` (none without batch curves)."""
        B = _check_batch_size(batch_size)
        n = np.atleast_1d(np.asarray(n, dtype=np.float64))
        contexts = np.atleast_1d(np.asarray(contexts, dtype=np.float64))
        sizes = self.batch_sizes
        curve = lambda s: self.verify_ms if s == 0 else self.batch_verify_ms[s - 1]  # noqa: E731
        at = lambda s, x: eval_curves(self.node_grid, self._curves_at(contexts, curve(s)), x)  # noqa: E731
        if B >= sizes[-1]:
            last = len(sizes) - 1
            same_slots = at(last, B * (n + 1) / sizes[-1] - 1)
            if last == 0:
                return same_slots
            # What one more row costs at equal total slots, between the last two profiled sizes: [L, 1].
            b0, b1 = sizes[-2], sizes[-1]
            per_row = np.maximum(0.0, (at(last, [0.0]) - at(last - 1, [b1 / b0 - 1])) / (b1 - b0))
            return same_slots + (B - b1) * per_row
        j = int(np.searchsorted(sizes, B, side="right")) - 1
        w = (B - sizes[j]) / (sizes[j + 1] - sizes[j])
        return (1 - w) * at(j, n) + w * at(j + 1, n)

    def padded_cost(self, batch_size: int, n, context: float) -> np.ndarray:
        """``Cv(B, n; context)`` in ms: one forward over ``batch_size`` requests of ``n + 1`` slots each
        (``n`` int, float or ``[M]``; one context, the batch's mean)."""
        return self._padded(batch_size, n, [context])[0]

    def ragged_cost(self, batch_size: int, t, context: float) -> np.ndarray:
        """Modelled varlen verify cost of ``batch_size`` roots plus ``t`` nodes in all (``t`` int or
        ``[M]``): the padded cost at the same total slots, ``padded_cost(B, t / B)``. No runner has a
        varlen verify to measure it."""
        B = _check_batch_size(batch_size)
        return self.padded_cost(B, np.atleast_1d(np.asarray(t, dtype=np.float64)) / B, context)

    def draft_cost_at(self, batch_size: int) -> float:
        """``Cd`` (ms) of a drafter round over ``batch_size`` requests: linear between profiled batch sizes,
        the last segment's slope (>= 0) past the largest; :attr:`draft_cost` at every size if the drafter
        was not profiled per batch size."""
        B = _check_batch_size(batch_size)
        if not self.batch_draft_ms:  # None, or profiled at batch size 1 alone: no slope to extrapolate
            return self.draft_cost
        sizes = np.asarray(self.batch_sizes, dtype=np.float64)
        drafts = np.asarray([self.draft_cost, *self.batch_draft_ms])
        if B <= sizes[-1]:
            return float(np.interp(B, sizes, drafts))
        slope = max(0.0, (drafts[-1] - drafts[-2]) / (sizes[-1] - sizes[-2]))
        return float(drafts[-1] + slope * (B - sizes[-1]))

    def table(self, context_lens: torch.Tensor, max_nodes: int, max_context: Optional[int] = None,
              mode: str = "request") -> torch.Tensor:
        """Verify-cost table for ``build_tree(..., budget_mode=mode)``, in ms (the unit of :attr:`draft_cost`;
        pass :meth:`draft_cost_at` of the batch size with the batch modes).

        context_lens: ``[B]`` int64 (any device). Returns float32 on context_lens' device:

        * ``"request"``: ``[B, max_nodes + 1]``, ``out[b, n] = Cv(n; context_lens[b])`` (batch 1);
        * ``"batch"``: ``[1, max_nodes + 1]``, ``out[0, n] = Cv(B, n; l)``, every request with ``n`` nodes
          in one padded forward;
        * ``"ragged"``: ``[1, B * max_nodes + 1]``, ``out[0, t] = Cv_ragged(B, t; l)``, ``B`` roots plus ``t``
          nodes (modelled from the padded curves, see the module docstring);

        with ``l`` the batch's mean context (computed on the device).

        Cheap per round and free of host syncs: contexts are bucketed by ``bucket`` tokens (each bucket
        evaluated at its centre, so within half a bucket of the exact context); a dense
        ``[num_buckets, max_nodes + 1]`` table per (device, max_nodes) covering ``0..max_context`` is
        built once and cached, and a call is one gather indexed by ``context_lens // bucket`` on the
        device. ``max_context`` (default :attr:`max_context`; pass the KV cache capacity) is the largest
        context covered: longer ones get its bucket's row. Building the cache once copies it to the device
        (a sync); later calls with the same (device, max_nodes, max_context, mode, and for the batch modes
        batch size) do not sync, so make that first call before capturing a CUDA graph that calls this.
        The ragged cache is ``[num_buckets, B * max_nodes + 1]``: pass ``max_context`` as the KV capacity.
        """
        if mode not in MODES:
            raise ValueError(f"unknown budget mode {mode!r}; choose from {', '.join(MODES)}")
        if max_nodes < 0:
            raise ValueError(f"max_nodes must be non-negative, got {max_nodes}")
        if context_lens.dim() != 1 or context_lens.shape[0] < 1:
            raise ValueError(f"context_lens must be [B] with B >= 1, got shape {list(context_lens.shape)}")
        B = context_lens.shape[0] if mode != "request" else 1  # the request table is the same for any B
        num_buckets = int(max_context if max_context is not None else self.max_context) // self.bucket + 1
        key = (context_lens.device, int(max_nodes), self.bucket, num_buckets, mode, B)
        dense = self._tables.get(key)
        if dense is None:
            centres = np.arange(num_buckets) * self.bucket + self.bucket / 2
            if mode == "request":
                values = eval_curves(self.node_grid, self._curves_at(centres), np.arange(max_nodes + 1))
            elif mode == "batch":
                values = self._padded(B, np.arange(max_nodes + 1), centres)
            else:
                values = self._padded(B, np.arange(B * max_nodes + 1) / B, centres)
            dense = torch.tensor(values, dtype=torch.float32, device=context_lens.device)
            self._tables[key] = dense
        if mode == "request":
            lens = context_lens
        else:  # the batch's mean context, on the device
            lens = torch.div(context_lens.sum(0, keepdim=True), B, rounding_mode="floor")
        idx = torch.clamp(torch.div(lens, self.bucket, rounding_mode="floor"), 0, num_buckets - 1)
        return dense.index_select(0, idx)

    # ---------------------------------------------------------------------------------------------
    # Construction

    @classmethod
    def fit(
        cls,
        node_grid: Sequence[int],
        contexts: Sequence[int],
        verify_median_ms,
        draft_cost: float,
        *,
        verify_iqr_ms=None,
        draft_iqr_ms: Optional[float] = None,
        meta: Optional[dict] = None,
        batch_sizes: Optional[Sequence[int]] = None,
        batch_draft_ms: Optional[Sequence[float]] = None,
    ) -> "CostModel":
        """Fit a non-decreasing curve per context (and per batch size) to measured medians.

        verify_median_ms / verify_iqr_ms: ``[C, G]`` ms at ``contexts [C]`` x ``node_grid [G]``, or with
        ``batch_sizes [S]`` (starting at 1) ``[S, C, G]``; draft_cost: measured ``Cd`` median (ms) at
        batch 1; batch_draft_ms: ``[S-1]`` medians at the other batch sizes. The raw measurements are
        kept in ``measured``.
        """
        med = np.asarray(verify_median_ms, dtype=np.float64)
        shape = (len(contexts), len(node_grid))
        if batch_sizes is not None:
            shape = (len(batch_sizes),) + shape
        if med.shape != shape:
            raise ValueError(f"medians must have shape {list(shape)}, got {list(med.shape)}")
        fitted = np.stack([fit_monotone(node_grid, row) for row in med.reshape(-1, shape[-1])]).reshape(shape)
        measured = {"verify_median_ms": med.tolist(), "draft_median_ms": float(draft_cost)}
        if verify_iqr_ms is not None:
            measured["verify_iqr_ms"] = np.asarray(verify_iqr_ms, dtype=np.float64).tolist()
        if draft_iqr_ms is not None:
            measured["draft_iqr_ms"] = float(draft_iqr_ms)
        if batch_sizes is None:
            return cls(list(node_grid), list(contexts), fitted, draft_cost, meta=dict(meta or {}), measured=measured)
        measured["batch_sizes"] = list(batch_sizes)
        if batch_draft_ms is not None:
            measured["batch_draft_median_ms"] = [float(d) for d in batch_draft_ms]
        return cls(list(node_grid), list(contexts), fitted[0], draft_cost, meta=dict(meta or {}), measured=measured,
                   batch_sizes=list(batch_sizes), batch_verify_ms=fitted[1:],
                   batch_draft_ms=None if batch_draft_ms is None else list(batch_draft_ms))

    @classmethod
    def default(cls, config, device=None, dtype: torch.dtype = torch.bfloat16, drafter_config=None) -> "CostModel":
        """Roofline estimate from the target's shape and the device, for use without a profile.

        ``Cv(n; l) = overhead + max(W / bw, (n+1) F / rate) + max(l K / bw, (n+1) l A / rate)`` with
        ``W`` the bytes of the weights one forward reads (decoder layers + LM head), ``F`` the matmul
        FLOPs per token, ``K`` the KV bytes per context token and ``A`` the attention FLOPs per
        (query, context token). Each max of affine functions of ``n`` is non-decreasing (and convex),
        so ``Cv`` is too. ``bw`` and ``rate`` are measured once per device and cached
        (:func:`ddtree.timing.device_rates`). ``Cd``: the same roofline over the drafter's layers (plus the shared
        LM head) for ``block_size`` tokens if ``drafter_config`` is given, else ``DRAFT_FRACTION *
        Cv(0; 0)``.
        """
        device = torch.device(device) if device is not None else (
            torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
        rates = device_rates(device, dtype)
        bw = rates["bandwidth_gbs"] * 1e9 / 1e3  # bytes per ms
        rate = rates["matmul_tflops"] * 1e12 / 1e3  # FLOPs per ms
        shape = _model_shape(config)
        elt = torch.empty((), dtype=dtype).element_size()
        weights = shape["layer_params"] * shape["layers"] + shape["vocab"] * shape["hidden"]
        kv_per_token = 2 * shape["layers"] * shape["kv_heads"] * shape["head_dim"] * elt
        attn_per_pair = 4 * shape["layers"] * shape["heads"] * shape["head_dim"]
        overhead = OVERHEAD_MS + OVERHEAD_MS_PER_LAYER * shape["layers"]

        # Both maxima switch from the memory to the compute term at a node count independent of l; put
        # the integers either side of each switch on the grid so interpolation is exact at every n.
        switches = (rate * elt / (2 * bw) - 1, rate * kv_per_token / (bw * attn_per_pair) - 1)
        extra = {f(s) for s in switches for f in (math.floor, math.ceil) if 0 < s < 4096}
        node_grid = sorted(set(default_node_grid(4096)) | extra)
        contexts = [0, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072]
        tokens = np.asarray(node_grid, dtype=np.float64)[None, :] + 1  # [1, G] slots
        ctx = np.asarray(contexts, dtype=np.float64)[:, None]  # [C, 1]
        dense = np.maximum(weights * elt / bw, tokens * 2 * weights / rate)
        attn = np.maximum(ctx * kv_per_token / bw, tokens * ctx * attn_per_pair / rate)
        verify = overhead + dense + attn  # [C, G]

        if drafter_config is not None:
            d = _model_shape(drafter_config, vocab=shape["vocab"])
            block = int(getattr(drafter_config, "block_size", None) or 16)
            d_weights = d["layer_params"] * d["layers"] + shape["vocab"] * shape["hidden"]
            draft = (OVERHEAD_MS + OVERHEAD_MS_PER_LAYER * d["layers"]
                     + max(d_weights * elt / bw, block * 2 * d_weights / rate))
        else:
            draft = DRAFT_FRACTION * float(verify[0, 0])
        meta = {
            "source": "default (roofline estimate)",
            "created": _now(),
            "device": {"name": rates["name"], "bandwidth_gbs": rates["bandwidth_gbs"],
                       "matmul_tflops": rates["matmul_tflops"]},
            "software": _software(),
            "model": model_identity(config, dtype),
        }
        if drafter_config is not None:
            meta["drafter"] = model_identity(drafter_config, dtype)
        return cls(node_grid, contexts, verify, draft, meta=meta)

    # ---------------------------------------------------------------------------------------------
    # JSON

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            "units": "ms",
            **{k: v for k, v in self.meta.items() if k not in _CORE_KEYS},
            "draft_cost_ms": self.draft_cost,
            "contexts": self.contexts,
            "node_grid": self.node_grid,
            "verify_ms": self.verify_ms.tolist(),
            "batch_sizes": self.batch_sizes,
            "batch_verify_ms": self.batch_verify_ms.tolist(),
            "batch_draft_ms": self.batch_draft_ms,
            "batch_model": {"padded": PADDED_MODEL if self.has_batch_curves else PADDED_FALLBACK,
                            "ragged": RAGGED_MODEL, "contexts": CONTEXT_MODEL},
            "measured": self.measured,
            **({"chain": self.chain.to_dict()} if self.chain is not None else {}),
        }

    @classmethod
    def from_dict(cls, d: Any) -> "CostModel":
        """Inverse of :meth:`to_dict`; raises ``ValueError`` naming what is wrong."""
        if not isinstance(d, dict):
            raise ValueError(f"cost model JSON must be an object, got {type(d).__name__}")
        if d.get("format") != FORMAT:
            raise ValueError(f"not a ddtree cost model: 'format' is {d.get('format')!r}, expected {FORMAT!r}")
        version = d.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise ValueError(f"cost model 'version' must be a positive integer, got {version!r}")
        if version > VERSION:
            raise ValueError(f"cost model version {version} is newer than this ddtree supports ({VERSION}); "
                             "upgrade ddtree or re-run `ddtree profile`")
        if d.get("units", "ms") != "ms":
            raise ValueError(f"cost model 'units' must be 'ms', got {d.get('units')!r}")
        missing = [k for k in ("draft_cost_ms", "contexts", "node_grid", "verify_ms") if k not in d]
        if missing:
            raise ValueError(f"cost model JSON is missing {', '.join(repr(k) for k in missing)}")
        try:
            verify = np.asarray(d["verify_ms"], dtype=np.float64)
            draft = float(d["draft_cost_ms"])
            contexts, node_grid = list(d["contexts"]), list(d["node_grid"])
        except (TypeError, ValueError) as e:
            raise ValueError(f"cost model JSON has a malformed field: {e}") from None
        for name, seq in (("contexts", contexts), ("node_grid", node_grid)):
            if not all(isinstance(x, int) and not isinstance(x, bool) for x in seq):
                raise ValueError(f"cost model {name!r} must be a list of integers")
        meta = {k: v for k, v in d.items() if k not in _CORE_KEYS}
        batches = {}
        if version >= 2:  # version 1 has no batch curves: batches fall back to the batch-1 curve
            batches = {"batch_sizes": d.get("batch_sizes"), "batch_verify_ms": d.get("batch_verify_ms"),
                       "batch_draft_ms": d.get("batch_draft_ms")}
            if batches["batch_sizes"] is not None and not isinstance(batches["batch_sizes"], list):
                raise ValueError("cost model 'batch_sizes' must be a list of integers")
            try:
                if batches["batch_verify_ms"] is not None:
                    batches["batch_verify_ms"] = np.asarray(batches["batch_verify_ms"], dtype=np.float64)
            except (TypeError, ValueError) as e:
                raise ValueError(f"cost model JSON has a malformed field: {e}") from None
        chain = d.get("chain")
        if chain is not None:
            try:
                chain = cls.from_dict(chain)
            except ValueError as e:
                raise ValueError(f"cost model 'chain': {e}") from None
        return cls(node_grid, contexts, verify, draft, meta=meta, measured=d.get("measured"), chain=chain, **batches)

    def save(self, path) -> None:
        """Write the model as JSON (never pickle) to ``path``."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path) -> "CostModel":
        """Read a model written by :meth:`save`; ``ValueError`` if malformed, truncated or too new."""
        text = Path(path).read_text()
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON (truncated or corrupt?): {e}") from None
        try:
            return cls.from_dict(d)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None


_CORE_KEYS = {"format", "version", "units", "draft_cost_ms", "contexts", "node_grid", "verify_ms", "measured",
              "batch_sizes", "batch_verify_ms", "batch_draft_ms", "batch_model", "chain"}
# What the JSON says about how batches are priced (see the module docstring).
PADDED_MODEL = ("measured: padded forwards of B requests x (n+1) slots at the profiled batch sizes; linear in B "
                "between them; past the largest, its curve at the same total slots plus a per-row cost (what a row "
                "costs at equal total slots between the last two profiled sizes)")
PADDED_FALLBACK = ("estimated: no batch curves profiled; B requests x (n+1) slots cost what one request with "
                   "B(n+1)-1 nodes costs (the batch-1 curve at the same total slots)")
RAGGED_MODEL = ("modelled, not measured (no ddtree runner has a varlen verify): B roots + t nodes cost what the "
                "padded forward of B rows at the same total slots costs, Cv(B, t/B)")
CONTEXT_MODEL = "a batch is priced at its mean context (the profile's B requests share one context)"


def _check_batch_size(batch_size) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    return int(batch_size)


# -------------------------------------------------------------------------------------------------
# Model identity and shape


def model_identity(config, dtype: Optional[torch.dtype] = None) -> dict:
    """What identifies the profiled model: name_or_path, a hash of its config, layer count, hidden size."""
    if hasattr(config, "to_dict"):
        cfg = config.to_dict()
    else:
        cfg = dict(vars(config))
    # Drop bookkeeping that does not change the architecture (paths, library versions, dtype choice).
    arch = {k: v for k, v in cfg.items() if not k.startswith("_") and k not in ("transformers_version", "torch_dtype", "dtype")}
    digest = hashlib.sha256(json.dumps(arch, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return {
        "name_or_path": getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None),
        "model_type": cfg.get("model_type"),
        "config_hash": digest,
        "num_hidden_layers": cfg.get("num_hidden_layers"),
        "hidden_size": cfg.get("hidden_size"),
        "dtype": str(dtype).removeprefix("torch.") if dtype is not None else None,
    }


def _model_shape(config, vocab: Optional[int] = None) -> dict:
    """Layer count, widths and parameters per decoder layer of a Llama/Qwen-style config."""
    g = lambda name, default=None: getattr(config, name, None) or default  # noqa: E731
    hidden = int(g("hidden_size"))
    heads = int(g("num_attention_heads"))
    kv_heads = int(g("num_key_value_heads", heads))
    head_dim = int(g("head_dim", hidden // heads))
    inter = int(g("intermediate_size", 4 * hidden))
    attn = hidden * head_dim * (2 * heads + 2 * kv_heads)  # q, o and k, v projections
    mlp = 3 * hidden * inter  # gated MLP: gate, up, down
    return {"layers": int(g("num_hidden_layers")), "hidden": hidden, "heads": heads, "kv_heads": kv_heads,
            "head_dim": head_dim, "vocab": int(vocab or g("vocab_size")), "layer_params": attn + mlp}


# -------------------------------------------------------------------------------------------------
# Profiling


def synthetic_tree(num_nodes: int, context_len: int, *, batch_size: int = 1, depth: int = 16, topk: int = 8,
                   vocab_size: int = 32000, generator: Optional[torch.Generator] = None):
    """A DDTree of exactly ``num_nodes`` nodes (``num_nodes + 1`` slots) from random peaked marginals,
    built on CPU with :func:`ddtree.build_tree` at ``max_nodes = num_nodes``; positions start at
    ``context_len``. Shapes as in :class:`ddtree.DraftTree` with ``B = batch_size``."""
    from .ops import build_tree

    if sum(topk**d for d in range(1, depth + 1)) < num_nodes:  # candidates: rank sequences of length 1..depth
        raise ValueError(f"depth {depth} x topk {topk} cannot hold {num_nodes} nodes")
    logits = 3.0 * torch.randn(batch_size, depth, topk, generator=generator)
    logprobs = torch.log_softmax(logits, dim=-1).sort(dim=-1, descending=True).values
    token_ids = torch.randint(0, vocab_size, (batch_size, depth, topk), generator=generator)
    roots = torch.randint(0, vocab_size, (batch_size,), generator=generator)
    ctx = torch.full((batch_size,), int(context_len), dtype=torch.int64)
    return build_tree(logprobs, token_ids, roots, ctx, int(num_nodes))


def profile(
    runner,
    drafter_round: Optional[Callable[[], Any]] = None,
    *,
    max_nodes: int,
    contexts: Sequence[int],
    node_grid: Optional[Sequence[int]] = None,
    warmup: int = 3,
    repeats: int = 10,
    batch_size: int = 1,
    batch_sizes: Optional[Sequence[int]] = None,
    drafter_round_at: Optional[Callable[[int], Callable[[], Any]]] = None,
    progress: bool = True,
    seed: int = 0,
) -> CostModel:
    """Measure ``Cd`` and ``Cv(n; l)`` on a target runner and fit a :class:`CostModel`.

    runner: a target runner (``ddtree.target.TargetRunner``: ``reset``, ``verify``, ``context_lens``,
    ``device``, ``dtype``, ``config``, ``vocab_size``). For each context ``l`` in ``contexts`` and each
    ``n`` in ``node_grid`` (default :func:`default_node_grid` of ``max_nodes``) it times
    ``runner.verify(tree)`` on a synthetic tree of exactly ``n`` nodes with ``context_lens`` filled with
    ``l`` (verify leaves ``context_lens`` unchanged, so repeats see the same state): ``warmup`` untimed
    calls, then ``repeats`` timed ones (CUDA events on CUDA, perf_counter on CPU); median and IQR in ms.
    The cache is reset once per batch size to ``B`` x ``max(contexts) + max(node_grid) + 1`` positions
    (the KV contents are whatever reset leaves: timing does not depend on them).

    drafter_round: a zero-argument callable that runs one full drafter round (timed the same way); if
    ``None``, ``Cd`` is estimated as ``DRAFT_FRACTION * Cv(0; contexts[0])``.

    batch_size (without batch_sizes): the rows of every timed forward; the model's curves are then those
    of that batch size (kept for benchmarks that profile one size at a time).

    batch_sizes: profile the padded batch curves too: ``[S]`` positive, strictly increasing, starting at
    1 (the per-request curve); each size gets its own ``reset`` and its own pass over the grid (the
    forward is ``B x (n + 1)`` slots, every request at context ``l``), and ``batch_size`` must be left at
    1. drafter_round_at(B) returns the zero-argument drafter round over ``B`` requests (it replaces
    ``drafter_round``; ``None``: ``Cd`` estimated as above, the same at every batch size). The ragged cost
    is not measured (no runner has a varlen verify): the model reads it off the padded curves.
    """
    from tqdm.auto import tqdm

    grid = list(node_grid) if node_grid is not None else default_node_grid(max_nodes)
    contexts = sorted(int(c) for c in contexts)
    if not contexts or contexts[0] < 0:
        raise ValueError(f"contexts must be a non-empty list of non-negative lengths, got {contexts}")
    if batch_sizes is not None:
        sizes = list(batch_sizes)
        if (not sizes or not all(isinstance(b, int) and not isinstance(b, bool) for b in sizes) or sizes[0] != 1
                or any(b <= a for a, b in zip(sizes, sizes[1:]))):
            raise ValueError(f"batch_sizes must be positive integers, strictly increasing, starting at 1, got {sizes}")
        if batch_size != 1:
            raise ValueError("give batch_size or batch_sizes, not both")
        if drafter_round is not None:
            raise ValueError("with batch_sizes, give the drafter round as drafter_round_at(batch_size)")
    else:
        sizes = [batch_size]
        if drafter_round_at is not None:
            drafter_round = drafter_round_at(batch_size)
    device = torch.device(runner.device)
    gen = torch.Generator().manual_seed(seed)

    med = np.zeros((len(sizes), len(contexts), len(grid)))
    iqr = np.zeros_like(med)
    draft_med, draft_iqr = [None] * len(sizes), [None] * len(sizes)
    bar = tqdm(total=med.size, desc="profile Cv(n; l)", unit="pt", disable=not progress)
    with torch.inference_mode():
        for s, B in enumerate(sizes):
            runner.reset(B, contexts[-1] + grid[-1] + 1)
            trees = {n: synthetic_tree(n, 0, batch_size=B, vocab_size=int(runner.vocab_size), generator=gen)
                     for n in grid}
            for i, ctx in enumerate(contexts):
                for j, n in enumerate(grid):
                    bar.set_postfix(B=B, l=ctx, n=n)
                    tree = trees[n]
                    tree.positions = tree.depths.to(torch.int64) + ctx  # positions = context_len + depth
                    tree = tree.to(device)
                    runner.context_lens.fill_(ctx)  # in place: a graph-captured verify reads this buffer
                    med[s, i, j], iqr[s, i, j] = median_iqr(
                        timing.samples_ms(lambda: runner.verify(tree), device, warmup, repeats))
                    bar.update()
            round_fn = drafter_round_at(B) if batch_sizes is not None and drafter_round_at is not None else (
                drafter_round if batch_sizes is None else None)
            if round_fn is not None:
                draft_med[s], draft_iqr[s] = median_iqr(timing.samples_ms(round_fn, device, warmup, repeats))
        bar.close()

    meta = {
        "source": "profile",
        "created": _now(),
        "device": {"name": device_name(device)},
        "software": _software(),
        "model": model_identity(runner.config, getattr(runner, "dtype", None)),
        "profile": {"warmup": warmup, "repeats": repeats, "batch_size": batch_size, "seed": seed,
                    "draft_cost": "measured" if draft_med[0] is not None else "estimated"},
    }
    if batch_sizes is None:
        model = CostModel.fit(grid, contexts, med[0], draft_med[0] if draft_med[0] is not None else 0.0,
                              verify_iqr_ms=iqr[0], draft_iqr_ms=draft_iqr[0], meta=meta)
    else:
        meta["profile"].update(batch_sizes=sizes, ragged="modelled from the padded curves (no varlen runner)")
        measured_drafts = draft_med[0] is not None
        model = CostModel.fit(grid, contexts, med, draft_med[0] if measured_drafts else 0.0, verify_iqr_ms=iqr,
                              draft_iqr_ms=draft_iqr[0], meta=meta, batch_sizes=sizes,
                              batch_draft_ms=draft_med[1:] if measured_drafts else None)
        if measured_drafts:
            model.measured["batch_draft_iqr_ms"] = draft_iqr[1:]
    if draft_med[0] is None:  # no drafter to time: the same estimate as CostModel.default without a drafter
        model.draft_cost = DRAFT_FRACTION * float(model.verify_ms[0, 0])
        model.measured["draft_median_ms"] = None
    return model


def round_overhead_ms(out) -> float:
    """What a round of a real decode costs beyond its verify forward, in ms: the part ``Cd`` must price.

    out: a :class:`ddtree.decode.GenerateOutput`. The result is ``(total_s - prefill_s - sum_r verify_s_r) /
    rounds``: the rounds' wall time less their verify forwards, per round, both from the same decode (so
    load that comes and goes on a shared machine falls on both alike). It is the drafter forward and every
    fixed step of a round (top-k, tree build, sampling, acceptance, cache commit, the host's
    synchronisation, Python), which on a model this small are a large part of a round.
    """
    if not out.rounds:
        raise ValueError("round_overhead_ms needs a decode with at least one round")
    rounds_s = out.total_s - out.prefill_s
    return max(0.0, (rounds_s - sum(r.verify_s for r in out.rounds)) * 1e3 / len(out.rounds))


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _software() -> dict:
    try:
        from . import __version__ as ddtree_version
    except ImportError:  # pragma: no cover - the extension failed to load
        ddtree_version = None
    return {"torch": torch.__version__, "ddtree": ddtree_version}
