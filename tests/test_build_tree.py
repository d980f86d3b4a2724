"""build_tree against the reference heap (every field identical, scores bit for bit), the tree's
structural properties, and brute-force enumeration of all rank sequences for small D and K."""
from __future__ import annotations

import itertools
import math
from dataclasses import fields

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

import ddtree
import reference as ref
from conftest import devices
from inputs import (LOGIT_KINDS, a800_cost, concave_cost, context_lens, convex_cost, make_logits, random_cost,
                    seed_of)

EPS32 = torch.finfo(torch.float32).eps
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
COST_MODES = ("fixed", "convex", "concave", "random", "a800")


def make_case(B, D, K, max_nodes, mode, kind, dtype, gen):
    """Inputs of build_tree: the reference top-k of random logits, roots, ragged contexts, costs."""
    V = K + int(torch.randint(0, 40, (1,), generator=gen))
    logprobs, token_ids = ref.topk_marginals(make_logits(B, D, V, dtype, kind, gen), K)
    roots = torch.randint(0, V, (B,), generator=gen)
    ctx = context_lens(B, 1000, gen)
    draft_cost = float(torch.rand(1, generator=gen)) * 0.05
    if mode == "fixed":
        cost = None
    elif mode == "convex":
        cost = convex_cost(B, max_nodes + 1, gen)
    elif mode == "concave":
        cost = concave_cost(B, max_nodes + 1, gen)
    elif mode == "random":
        cost = random_cost(B, max_nodes + 1, gen)
    else:
        cost, draft_cost = a800_cost(B, max_nodes + 1, gen)
    return logprobs, token_ids, roots, ctx, max_nodes, cost, draft_cost


def run_kernel(device, logprobs, token_ids, roots, ctx, max_nodes, cost, draft_cost) -> ddtree.DraftTree:
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    tree = ddtree.build_tree(to(logprobs), to(token_ids), to(roots), to(ctx), max_nodes, to(cost), draft_cost)
    return tree.to("cpu")


def assert_same_tree(got: ddtree.DraftTree, expected: dict) -> None:
    for f in fields(got):
        g, e = getattr(got, f.name), expected[f.name]
        assert g.dtype == e.dtype and g.shape == e.shape, f"{f.name}: {g.dtype}{tuple(g.shape)} vs {e.dtype}{tuple(e.shape)}"
        if not torch.equal(g, e):
            where = (g != e).nonzero()[:5].tolist()
            raise AssertionError(f"{f.name} differs at {where}:\n got {g}\n expected {e}")


def rank_sequences(tree: ddtree.DraftTree, token_ids: torch.Tensor, b: int) -> list[tuple[int, ...]]:
    """Each used slot's rank sequence (slot 0: ``()``), recovered through the token ids, which are
    distinct within a (request, depth) row when they come from topk_marginals."""
    seqs = [()]
    for slot in range(1, int(tree.num_nodes[b]) + 1):
        d = int(tree.depths[b, slot])
        rank = token_ids[b, d - 1].tolist().index(int(tree.tokens[b, slot]))
        seqs.append(seqs[int(tree.parents[b, slot])] + (rank,))
    return seqs


def check_structure(tree: ddtree.DraftTree, logprobs, token_ids, roots, ctx, max_nodes, sorted_input=True):
    """The properties every tree has, whatever the selection rule."""
    B, D, K = logprobs.shape
    T = max_nodes + 1
    assert tree.tokens.shape == (B, T) and tree.tree_mask.shape == (B, T, (T + 31) // 32)
    dense = tree.dense_mask()
    for b in range(B):
        n = int(tree.num_nodes[b])
        assert 0 <= n <= max_nodes
        c = int(ctx[b])
        assert int(tree.tokens[b, 0]) == int(roots[b]) and int(tree.parents[b, 0]) == -1
        assert int(tree.depths[b, 0]) == 0 and float(tree.scores[b, 0]) == 0.0
        closure = [{0}]
        for i in range(1, n + 1):
            p = int(tree.parents[b, i])
            assert 0 <= p < i, "a parent's slot precedes its child's"
            d = int(tree.depths[b, i])
            assert d == int(tree.depths[b, p]) + 1 and 1 <= d <= D
            closure.append(closure[p] | {i})
            # The token is one of the candidates at its depth, and the score adds its log-prob in fp32.
            row = token_ids[b, d - 1].tolist()
            r = row.index(int(tree.tokens[b, i]))
            lp = np.float32(logprobs[b, d - 1, r])
            lp = np.float32(-np.inf) if np.isnan(lp) else lp
            s = np.float32(np.float32(float(tree.scores[b, p])) + lp)
            s = np.float32(-np.inf) if np.isnan(s) else s
            assert np.float32(float(tree.scores[b, i])) == s or (np.isneginf(s) and np.isneginf(float(tree.scores[b, i])))
            if sorted_input:
                assert float(tree.scores[b, i]) <= float(tree.scores[b, i - 1]), "popped in score order"
        assert (tree.positions[b] == c + tree.depths[b].long()).all()
        for i in range(T):
            expected_row = closure[i] if i <= n else set()
            assert set(dense[b, i].nonzero().flatten().tolist()) == expected_row, f"mask row {i}"
        # Unused slots.
        assert (tree.tokens[b, n + 1:] == 0).all() and (tree.parents[b, n + 1:] == -1).all()
        assert (tree.depths[b, n + 1:] == 0).all() and torch.isneginf(tree.scores[b, n + 1:]).all()
        assert (tree.tree_mask[b, n + 1:] == 0).all()
        # expected_tokens = 1 + sum of the chosen path probabilities, up to fp32 rounding.
        phi = sum(math.exp(float(s)) for s in tree.scores[b, 1:n + 1])
        assert abs(float(tree.expected_tokens[b]) - (1 + phi)) <= 2 * EPS32 * (1 + phi)
        if sorted_input and n:
            # Prefix-closed, and closed under "previous sibling": each (.., r) was pushed by (.., r-1).
            seqs = set(rank_sequences(tree, token_ids, b))
            for s in seqs - {()}:
                assert s[:-1] in seqs and (s[-1] == 0 or s[:-1] + (s[-1] - 1,) in seqs)


SHAPES = list(itertools.product((1, 3, 8), (1, 4, 15), (1, 4, 64), (0, 1, 16, 300)))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("mode", COST_MODES)
@pytest.mark.parametrize("B,D,K,max_nodes", SHAPES)
def test_matches_reference(B, D, K, max_nodes, mode, device):
    i = SHAPES.index((B, D, K, max_nodes)) + COST_MODES.index(mode)
    kind, dtype = LOGIT_KINDS[i % 3], DTYPES[(i // 3) % 3]  # every (kind, dtype) many times over the grid
    gen = torch.Generator().manual_seed(seed_of(B, D, K, max_nodes, mode))
    case = make_case(B, D, K, max_nodes, mode, kind, dtype, gen)
    got = run_kernel(device, *case)
    assert_same_tree(got, ref.build_tree(*case))
    check_structure(got, case[0], case[1], case[2], case[3], max_nodes)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("mode", COST_MODES)
@pytest.mark.parametrize("kind", LOGIT_KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kinds_and_dtypes(dtype, kind, mode, device):
    gen = torch.Generator().manual_seed(seed_of(dtype, kind, mode))
    case = make_case(3, 5, 8, 40, mode, kind, dtype, gen)
    got = run_kernel(device, *case)
    assert_same_tree(got, ref.build_tree(*case))
    check_structure(got, case[0], case[1], case[2], case[3], 40)


@pytest.mark.parametrize("device", devices())
def test_budget_larger_than_candidates(device):
    """max_nodes above the number of rank sequences (2 + 4 + 8 = 14): the whole tree, in heap order."""
    gen = torch.Generator().manual_seed(1)
    case = make_case(3, 3, 2, 40, "fixed", "normal", torch.float32, gen)
    got = run_kernel(device, *case)
    assert got.num_nodes.tolist() == [14, 14, 14]
    assert_same_tree(got, ref.build_tree(*case))
    check_structure(got, case[0], case[1], case[2], case[3], 40)


@pytest.mark.parametrize("device", devices())
def test_arbitrary_logprobs(device):
    """Unsorted log-probs with positive, infinite and NaN entries (not what topk_marginals gives, but
    valid input): the heap is still exactly the reference's, with NaN scores counting as -inf."""
    gen = torch.Generator().manual_seed(2)
    B, D, K, N = 4, 4, 6, 50
    lp = torch.randn(B, D, K, generator=gen) * 2
    u = torch.rand(B, D, K, generator=gen)
    lp[u < 0.1] = float("nan")
    lp[(u > 0.1) & (u < 0.15)] = float("inf")
    lp[(u > 0.15) & (u < 0.25)] = float("-inf")
    ids = torch.randint(0, 1000, (B, D, K), generator=gen)
    roots, ctx = torch.randint(0, 1000, (B,), generator=gen), context_lens(B, 100, gen)
    for cost, draft in ((None, 0.0), (convex_cost(B, N + 1, gen), 0.01)):
        case = (lp, ids, roots, ctx, N, cost, draft)
        got = run_kernel(device, *case)
        assert_same_tree(got, ref.build_tree(*case))


# --------------------------------------------------------------------------------------------------
# Brute force: enumerate every rank sequence of a small tree.


def all_candidates(logprobs: torch.Tensor) -> list[tuple[np.float32, tuple[int, ...]]]:
    """Every rank sequence of one request with its fp32 score (depth order), sorted in the contract's
    order: larger score first, then lexicographically smaller rank sequence."""
    D, K = logprobs.shape
    lp = [[np.float32(-np.inf) if math.isnan(x) else np.float32(x) for x in row] for row in logprobs.tolist()]
    out = []
    for d in range(1, D + 1):
        for seq in itertools.product(range(K), repeat=d):
            s = np.float32(0.0)
            for depth, r in enumerate(seq):
                s = np.float32(s + lp[depth][r])
            out.append((s, seq))
    return sorted(out, key=lambda c: (-c[0], c[1]))


@given(
    B=st.integers(1, 3), D=st.integers(1, 3), K=st.integers(1, 4), extra=st.integers(0, 3),
    frac=st.floats(0, 1), kind=st.sampled_from(LOGIT_KINDS), seed=st.integers(0, 2**31 - 1),
)
def test_brute_force_fixed_budget(B, D, K, extra, frac, kind, seed):
    gen = torch.Generator().manual_seed(seed)
    n_cand = sum(K**d for d in range(1, D + 1))
    max_nodes = int(frac * n_cand) + extra  # from 0 to past the number of candidates
    case = make_case(B, D, K, max_nodes, "fixed", kind, torch.float32, gen)
    got = run_kernel("cpu", *case)
    for b in range(B):
        best = [seq for _, seq in all_candidates(case[0][b])[:max_nodes]]
        assert int(got.num_nodes[b]) == min(max_nodes, n_cand)
        assert rank_sequences(got, case[1], b)[1:] == best, "slots hold the top-n in the contract's order"


@given(
    B=st.integers(1, 3), D=st.integers(1, 3), K=st.integers(1, 4), frac=st.floats(0, 1),
    kind=st.sampled_from(LOGIT_KINDS), cost_mode=st.sampled_from(("convex", "concave", "random")),
    seed=st.integers(0, 2**31 - 1),
)
def test_brute_force_cost_aware(B, D, K, frac, kind, cost_mode, seed):
    """The cost-aware tree is the first maximiser of theta(n) over n <= min(max_nodes, #candidates),
    brute force over every prefix of the sorted candidates, for any cost curve (convex, concave at small n
    like a CPU's fp32 verify, or shapeless)."""
    gen = torch.Generator().manual_seed(seed)
    n_cand = sum(K**d for d in range(1, D + 1))
    max_nodes = int(frac * (n_cand + 2))
    case = make_case(B, D, K, max_nodes, cost_mode, kind, torch.float32, gen)
    logprobs, cost, draft = case[0], case[5], case[6]
    got = run_kernel("cpu", *case)
    for b in range(B):
        cands = all_candidates(logprobs[b])[: min(max_nodes, n_cand)]
        phi, thetas = 0.0, [1.0 / (draft + float(cost[b, 0]))]
        for n, (s, _) in enumerate(cands, start=1):
            phi += math.exp(float(s))
            thetas.append((1.0 + phi) / (draft + float(cost[b, n])))
        best_n = thetas.index(max(thetas))
        assert int(got.num_nodes[b]) == best_n, f"theta = {thetas}"
        assert rank_sequences(got, case[1], b)[1:] == [seq for _, seq in cands[:best_n]]


def test_cost_aware_looks_past_a_first_node_that_does_not_pay():
    """A verify cost that jumps from one row to two and is flat after (the shape of small-M matrix
    products on a CPU): one node does not pay for the jump, a certain chain of 15 does. The first
    maximiser of theta takes the chain; stopping where theta first stops growing would verify the root
    alone."""
    D, K = 15, 2
    logprobs = torch.full((1, D, K), -30.0)
    logprobs[:, :, 0] = 0.0  # a certain chain, then candidates of probability ~1e-13
    ids = torch.arange(K).repeat(1, D, 1)
    draft = 100.0
    cost = torch.tensor([[10.0] + [150.0 + 0.01 * n for n in range(1, 31)]])  # [1, 31]
    theta = lambda n: (1.0 + n) / (draft + float(cost[0, n]))  # noqa: E731  n chain nodes, each p = 1
    assert theta(1) < theta(0) < theta(D), "the case needs theta to fall, then rise past its start"
    tree = ddtree.build_tree(logprobs, ids, torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long),
                             30, cost, draft)
    assert int(tree.num_nodes[0]) == D
    assert tree.depths[0, 1:D + 1].tolist() == list(range(1, D + 1))
    assert_same_tree(tree, ref.build_tree(logprobs, ids, torch.zeros(1, dtype=torch.long),
                                          torch.zeros(1, dtype=torch.long), 30, cost, draft))


def test_a800_budget_is_used():
    """On the real A800 curves, verification is nearly flat in n, so confident drafts get large trees and
    a uniform (unconfident) draft gets a small one: the stop rule reacts to the marginals."""
    B, D, K, N = 2, 15, 8, 300
    costs, draft = a800_cost(B, N + 1, torch.Generator().manual_seed(0))
    confident = torch.full((B, D, K), -20.0)
    confident[:, :, 0] = 0.0  # one certain chain, then nothing
    ids = torch.arange(K).repeat(B, D, 1)
    roots, ctx = torch.zeros(B, dtype=torch.long), torch.zeros(B, dtype=torch.long)
    tree = ddtree.build_tree(confident, ids, roots, ctx, N, costs, draft)
    assert (tree.num_nodes >= D).all(), "the certain chain is always worth verifying"
    uniform = torch.full((B, D, K), -math.log(1000.0))  # every candidate has probability 1e-3
    tree = ddtree.build_tree(uniform, ids, roots, ctx, N, costs, draft)
    assert (tree.num_nodes < N).all()
    assert_same_tree(tree, ref.build_tree(uniform, ids, roots, ctx, N, costs, draft))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("max_nodes", [0, 1, 5])
def test_outputs_do_not_alias_inputs(max_nodes, device):
    """The schema declares no aliasing: writing to an output must leave every input as it was."""
    gen = torch.Generator().manual_seed(12)
    case = make_case(3, 2, 2, max_nodes, "fixed", "normal", torch.float32, gen)
    inputs = [t.to(device) for t in case[:4]]
    before = [t.clone() for t in inputs]
    tree = ddtree.build_tree(*inputs, max_nodes)
    for f in fields(tree):
        getattr(tree, f.name).fill_(-7)
    for name, t, b in zip(("logprobs", "token_ids", "root_tokens", "context_lens"), inputs, before):
        assert torch.equal(t, b), f"an output aliases {name}"
