"""Plain PyTorch/Python reference of every ddtree op, written from the contracts alone.

The contracts are ``docs/DESIGN.md`` ("The ops") and the clarifications at the top of ``csrc/ops.h``. Each
function here is the slow, obvious version of one op: a dense softmax, a Python heap, a Python walk,
clone-then-write. The C++ kernels are tested against these functions, never the other way round, so
when they disagree the contract decides which one is wrong.

Shapes: ``B`` requests, ``D`` draft depth, ``V`` vocabulary, ``K`` candidates per depth, ``N``
max_nodes (tree arrays have ``T = N + 1`` slots, slot 0 is the root), ``W = ceil(T / 32)`` mask words,
``S`` cache positions, ``d`` head dim.
"""
from __future__ import annotations

import heapq
import math
import struct
from typing import Optional, Sequence

import numpy as np
import torch

NEG_INF = float("-inf")


# --------------------------------------------------------------------------------------------------
# topk_marginals


def topk_marginals(logits: torch.Tensor, k: int, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``k`` of ``log_softmax(logits / temperature)``, ties by smaller token id.

    logits ``[B, D, V]`` fp32/fp16/bf16. Returns ``(logprobs [B, D, k] f32, token_ids [B, D, k] i64)``.
    ``v = float(logit) / float(temperature)`` in fp32; NaN counts as -inf; a row with +inf entries gives
    each of them ``-log(count)`` and every other entry -inf; a row of only -inf/NaN is all -inf.
    """
    x = logits.float()
    # Divide by a full fp32 tensor rather than a Python scalar: a scalar divisor may be turned into a
    # multiplication by its reciprocal, which is not the fp32 division the contract names.
    v = x / torch.full_like(x, float(np.float32(temperature)))
    v = torch.where(torch.isnan(v), torch.full_like(v, NEG_INF), v)

    # Finite rows, the ordinary case: the log-softmax of the fp32 v computed in fp64, so the reference is exact
    # to fp32 rounding. torch's fp32 log_softmax is not: over 151936 values on an AVX2-only CPU its fp32 sum
    # errs by up to 2.4e-4 (measured), 500x the kernel's error and over the tolerance the kernel is held to.
    logp = torch.log_softmax(v.double(), dim=-1).float()
    pos_inf = torch.isposinf(v)
    n_pos_inf = pos_inf.sum(dim=-1, keepdim=True)
    inf_row_logp = torch.where(pos_inf, -torch.log(n_pos_inf.float()), torch.full_like(v, NEG_INF))
    logp = torch.where(n_pos_inf > 0, inf_row_logp, logp)
    all_neg_inf = torch.isneginf(v).all(dim=-1, keepdim=True)
    logp = torch.where(all_neg_inf, torch.full_like(v, NEG_INF), logp)

    # Order by v (not by the rounded log-prob), descending; a stable sort keeps equal values in token
    # id order, which is the tie rule.
    order = torch.sort(v, dim=-1, descending=True, stable=True).indices[..., :k]
    return torch.gather(logp, -1, order), order.to(torch.int64)


# --------------------------------------------------------------------------------------------------
# build_tree


_FP32 = struct.Struct("f")


def _f32(x: float) -> float:
    """x rounded to fp32 (kept as a Python float), NaN counted as -inf (the contract's rule for log-probs
    and their sums). The sum of two fp32 values computed in double and then rounded to fp32 is their fp32
    sum (a double carries more than twice fp32's precision), so ``_f32(a + b)`` is the fp32 addition."""
    if x != x:
        return NEG_INF
    try:
        return _FP32.unpack(_FP32.pack(x))[0]
    except OverflowError:  # rounds past the largest fp32: an infinity
        return math.copysign(math.inf, x)


def _exp(x: float) -> float:
    """exp in double, inf on overflow (math.exp is the C library's exp, as a C++ kernel calls)."""
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def _theta(phi: float, draft_cost: float, verify_cost: float) -> float:
    """theta = (1 + phi) / (draft_cost + verify_cost) in double, with IEEE results for a zero cost."""
    cost = float(draft_cost) + float(verify_cost)
    if cost == 0.0:  # Python's division raises here; IEEE gives +-inf (or NaN for 0 / 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            return float(np.float64(1.0 + phi) / np.float64(cost))
    return (1.0 + phi) / cost


def select_nodes(logprobs: torch.Tensor, max_nodes: int, verify_cost: Optional[Sequence[float]] = None,
                 draft_cost: float = 0.0, fp32: bool = True) -> list[tuple[tuple[int, ...], float]]:
    """One request's chosen nodes, in selection order, as ``(rank_sequence, score)``.

    logprobs ``[D, K]`` f32. The best-first heap of docs/DESIGN.md: it starts from ``(0,)`` and each pop
    of ``(..., r)`` pushes ``(..., r + 1)`` and ``(..., r, 0)``; the key ``(-score, rank_sequence)`` pops
    the larger score first and equal scores by the lexicographically smaller rank sequence (a prefix
    first). With ``verify_cost`` (``max_nodes + 1`` values) the first ``n`` nodes are kept, ``n`` the
    smallest maximising ``theta(n)`` over every prefix of the fixed-budget selection. With ``fp32=False``
    scores are summed in double, as a plain Python heap over float log-probs does: the benchmarks time it
    that way as the reference pipeline's heap.
    """
    add = (lambda a, b: _f32(a + b)) if fp32 else float.__add__
    lp = torch.where(logprobs.isnan(), NEG_INF, logprobs.float()).tolist()  # fp32 values, NaN as -inf
    D, K = len(lp), len(lp[0])
    heap = [(-lp[0][0], (0,), 0.0)]  # (-score, ranks, parent score)
    chosen: list[tuple[tuple[int, ...], float]] = []
    phi = 0.0
    best_theta, best_n = (_theta(0.0, draft_cost, verify_cost[0]), 0) if verify_cost is not None else (None, None)
    while heap and len(chosen) < max_nodes:
        neg_score, ranks, parent_score = heap[0]
        score = -neg_score
        heapq.heappop(heap)
        chosen.append((ranks, score))
        phi += _exp(score)
        if verify_cost is not None and _theta(phi, draft_cost, verify_cost[len(chosen)]) > best_theta:
            best_theta, best_n = _theta(phi, draft_cost, verify_cost[len(chosen)]), len(chosen)
        d, r = len(ranks), ranks[-1]
        if r + 1 < K:  # next sibling: same parent, next rank at this depth
            heapq.heappush(heap, (-add(parent_score, lp[d - 1][r + 1]), ranks[:-1] + (r + 1,), parent_score))
        if d < D:  # first child
            heapq.heappush(heap, (-add(score, lp[d][0]), ranks + (0,), score))
    return chosen if verify_cost is None else chosen[:best_n]


def build_tree(logprobs: torch.Tensor, token_ids: torch.Tensor, root_tokens: torch.Tensor,
               context_lens: torch.Tensor, max_nodes: int, verify_cost: Optional[torch.Tensor] = None,
               draft_cost: float = 0.0) -> dict[str, torch.Tensor]:
    """The draft trees, as a dict with the fields of ``ddtree.DraftTree``.

    logprobs ``[B, D, K]`` f32, token_ids ``[B, D, K]`` i64, root_tokens ``[B]`` i64, context_lens ``[B]``
    i64, verify_cost ``[B, >= max_nodes + 1]`` f32 or None. Returns num_nodes ``[B]`` i32, tokens
    ``[B, T]`` i64, parents ``[B, T]`` i32, depths ``[B, T]`` i32, positions ``[B, T]`` i64, scores
    ``[B, T]`` f32, tree_mask ``[B, T, W]`` i32, expected_tokens ``[B]`` f32. Unused slots: token 0,
    parent -1, depth 0, position context_len, score -inf, mask 0.
    """
    B = logprobs.shape[0]
    T = max_nodes + 1
    W = (T + 31) // 32
    fields = {name: [] for name in ("num_nodes", "tokens", "parents", "depths", "positions", "scores",
                                    "tree_mask", "expected_tokens")}
    for b in range(B):
        ctx = int(context_lens[b])
        costs = None if verify_cost is None else [float(c) for c in verify_cost[b].tolist()]
        chosen = select_nodes(logprobs[b], max_nodes, costs, draft_cost)
        ids = token_ids[b].tolist()
        # Slot 0 is the root; every other slot starts with the unused-slot values.
        tokens, parents, depths = [int(root_tokens[b])] + [0] * max_nodes, [-1] * T, [0] * T
        scores = [0.0] + [NEG_INF] * max_nodes
        ancestors = [1] + [0] * max_nodes  # bitmask over slots: the slot itself and its ancestors
        slot_of = {(): 0}
        for slot, (ranks, score) in enumerate(chosen, start=1):
            parent = slot_of[ranks[:-1]]
            slot_of[ranks] = slot
            tokens[slot] = ids[len(ranks) - 1][ranks[-1]]
            parents[slot] = parent
            depths[slot] = len(ranks)
            scores[slot] = float(score)
            ancestors[slot] = ancestors[parent] | (1 << slot)
        words = [[(bits >> (32 * w)) & 0xFFFFFFFF for w in range(W)] for bits in ancestors]
        phi = sum(_exp(float(s)) for _, s in chosen)  # summed in selection order, as the kernel does
        fields["num_nodes"].append(len(chosen))
        fields["tokens"].append(tokens)
        fields["parents"].append(parents)
        fields["depths"].append(depths)
        fields["positions"].append([ctx + d for d in depths])
        fields["scores"].append(scores)
        fields["tree_mask"].append([[w - (1 << 32) if w >= 1 << 31 else w for w in row] for row in words])
        fields["expected_tokens"].append(float(np.float32(1.0 + phi)))
    dtypes = {"num_nodes": torch.int32, "tokens": torch.int64, "parents": torch.int32, "depths": torch.int32,
              "positions": torch.int64, "scores": torch.float32, "tree_mask": torch.int32,
              "expected_tokens": torch.float32}
    return {name: torch.tensor(values, dtype=dtypes[name]).reshape(_shape(name, B, T, W))
            for name, values in fields.items()}


def _shape(name: str, B: int, T: int, W: int) -> tuple[int, ...]:
    return {"num_nodes": (B,), "expected_tokens": (B,), "tree_mask": (B, T, W)}.get(name, (B, T))


# --------------------------------------------------------------------------------------------------
# tree_attention


def dense_visibility(context_len: int, tree_mask: torch.Tensor, num_nodes: int, T: int) -> torch.Tensor:
    """``[T, context_len + T]`` bool: which cache positions each query row of one request attends to.

    tree_mask ``[T, W]`` i32. Row i sees positions ``[0, context_len)`` and ``context_len + j`` for every
    ``j <= num_nodes`` whose bit j is set in row i.
    """
    bits = torch.arange(32, dtype=torch.int64)
    words = tree_mask.to(torch.int64) & 0xFFFFFFFF  # the 32 bits of each word, unsigned
    tree = ((words.unsqueeze(-1) >> bits) & 1).flatten(-2)[:, :T].bool()  # [T, T]: bit j of row i
    tree[:, num_nodes + 1:] = False
    return torch.cat([torch.ones(T, context_len, dtype=torch.bool), tree], dim=1)


def tree_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, context_lens: torch.Tensor,
                   tree_mask: torch.Tensor, num_nodes: torch.Tensor, scale: float) -> torch.Tensor:
    """Dense-mask attention in float64, returned as ``[B, Hq, T, d]`` float64.

    q ``[B, Hq, T, d]``, k_cache / v_cache ``[B, Hkv, S, d]`` (query head h reads key/value head
    ``h // (Hq // Hkv)``), context_lens ``[B]`` i64, tree_mask ``[B, T, W]`` i32, num_nodes ``[B]`` i32.
    A row that sees no key is zero. Computed in float64 from the inputs' exact values, so it is the
    "true" result that every dtype is compared to with its own tolerance.
    """
    B, Hq, T, d = q.shape
    group = Hq // k_cache.shape[1]
    out = torch.zeros(B, Hq, T, d, dtype=torch.float64)
    for b in range(B):
        ctx = int(context_lens[b])
        visible = dense_visibility(ctx, tree_mask[b], int(num_nodes[b]), T)  # [T, ctx + T]
        k = k_cache[b, :, : ctx + T].double().repeat_interleave(group, dim=0)  # [Hq, ctx + T, d]
        v = v_cache[b, :, : ctx + T].double().repeat_interleave(group, dim=0)
        logits = (q[b].double() @ k.transpose(1, 2)) * scale  # [Hq, T, ctx + T]
        # Invisible keys get weight exactly 0 (masked_fill, not a -inf logit times a possibly NaN value).
        weights = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
        weights = torch.where(visible, weights, torch.zeros_like(weights))  # rows that see nothing: 0
        v = torch.where(visible.any(0)[:, None], v, 0.0)  # values no row sees are never read (may be NaN)
        out[b] = torch.einsum("hts,hsd->htd", weights, v)
    return out


# --------------------------------------------------------------------------------------------------
# accept_tree


def accept_tree(tokens: torch.Tensor, parents: torch.Tensor, num_nodes: torch.Tensor, target_tokens: torch.Tensor,
                max_depth: int = -1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The accepted root path and the bonus token.

    tokens ``[B, T]`` i64, parents ``[B, T]`` i32, num_nodes ``[B]`` i32, target_tokens ``[B, T]`` i64.
    At slot c the walk moves to the smallest slot j in (c, num_nodes] with parents[j] == c and
    tokens[j] == target_tokens[c]; it stops when there is none or when accepted_slots is full.
    Returns accepted_slots ``[B, A]`` i64 (-1 padded; ``A = T`` when max_depth < 0, else
    ``min(max_depth + 1, T)``), accept_len ``[B]`` i32 (root counted), next_token ``[B]`` i64.
    """
    B, T = tokens.shape
    A = T if max_depth < 0 else min(max_depth + 1, T)
    accepted = torch.full((B, A), -1, dtype=torch.int64)
    accept_len = torch.zeros(B, dtype=torch.int32)
    next_token = torch.zeros(B, dtype=torch.int64)
    for b in range(B):
        tok, par, tgt = tokens[b].tolist(), parents[b].tolist(), target_tokens[b].tolist()
        n = int(num_nodes[b])
        path = [0]
        while len(path) < A:
            c = path[-1]
            nxt = next((j for j in range(c + 1, n + 1) if par[j] == c and tok[j] == tgt[c]), None)
            if nxt is None:
                break
            path.append(nxt)
        accepted[b, : len(path)] = torch.tensor(path)
        accept_len[b] = len(path)
        next_token[b] = tgt[path[-1]]
    return accepted, accept_len, next_token


# --------------------------------------------------------------------------------------------------
# compact_kv


def compact_kv(caches: Sequence[torch.Tensor], context_lens: torch.Tensor, accepted_slots: torch.Tensor,
               accept_len: torch.Tensor) -> list[torch.Tensor]:
    """New caches (the inputs are left alone) after the commit move, read-all-then-write.

    caches: each ``[B, H, S, d]``; context_lens ``[B]`` i64; accepted_slots ``[B, A]`` i64; accept_len
    ``[B]`` i32. Position ``ctx + i`` receives the old entry at ``ctx + accepted_slots[b, i]`` for
    ``i < accept_len[b]``; every other position keeps its old value.
    """
    result = []
    for cache in caches:
        old = cache.clone()
        new = cache.clone()
        for b in range(cache.shape[0]):
            ctx = int(context_lens[b])
            for i in range(int(accept_len[b])):
                new[b, :, ctx + i] = old[b, :, ctx + int(accepted_slots[b, i])]
        result.append(new)
    return result


# --------------------------------------------------------------------------------------------------
# build_tree's batch-coupled budget modes


def batch_budget_cuts(scores: Sequence[Sequence[float]], verify_cost: Sequence[float], draft_cost: float,
                      mode: str) -> list[int]:
    """Each request's node count under ``budget_mode`` "batch" or "ragged" (csrc/ops.h, build_tree).

    scores: per request, the fp32 scores of its fixed-budget nodes in its own selection order.
    verify_cost: the one cost row (``N + 1`` entries for "batch", ``B * N + 1`` for "ragged").
    Written from the contract with exact sums (``math.fsum``): near-ties of Theta are where an
    implementation's rounding may decide otherwise.
    """
    B = len(scores)
    p = [[_exp(float(s)) for s in row] for row in scores]
    if mode == "batch":
        N = len(verify_cost) - 1

        def theta(n):
            return _theta(math.fsum(q for row in p for q in row[:n]) + B - 1, draft_cost, verify_cost[n])

        n = _first_argmax(theta, N)
        return [min(n, len(row)) for row in p]
    # ragged: merge the requests' sequences by descending score, ties to the smaller request index.
    order, cursor = [], [0] * B
    for _ in range(sum(len(row) for row in p)):
        b = max((b for b in range(B) if cursor[b] < len(p[b])), key=lambda b: (scores[b][cursor[b]], -b))
        order.append(b)
        cursor[b] += 1

    def theta(t):
        taken = [0] * B
        for b in order[:t]:
            taken[b] += 1
        return _theta(math.fsum(q for b in range(B) for q in p[b][: taken[b]]) + B - 1, draft_cost, verify_cost[t])

    t = _first_argmax(theta, len(order))
    return [order[:t].count(b) for b in range(B)]


def _first_argmax(theta, last: int) -> int:
    """The smallest of 0..last with the largest theta."""
    values = [theta(i) for i in range(last + 1)]
    return values.index(max(values))
