"""build_tree's batch-coupled budget modes ("batch": one node count for a padded verify; "ragged": the
batch's best nodes for a varlen verify) against the reference written from the contract, their
structural promises (a prefix of each request's fixed-budget tree; equal to per-request CaDDTree at
B = 1), the optimality that motivates them, and their argument errors."""
from __future__ import annotations

import math

import pytest
import torch

import ddtree
import reference as ref
from conftest import devices
from inputs import LOGIT_KINDS, a800_curves, context_lens, make_logits, seed_of

MODES = ("batch", "ragged")
NEAR_TIE = 1e-6  # the contract lets Theta comparisons closer than this go either way


def make_inputs(B, D, K, kind, gen):
    V = K + int(torch.randint(0, 30, (1,), generator=gen))
    logprobs, token_ids = ref.topk_marginals(make_logits(B, D, V, torch.float32, kind, gen), K)
    roots = torch.randint(0, V, (B,), generator=gen)
    return logprobs, token_ids, roots, context_lens(B, 500, gen)


def cost_row(kind: str, n: int, gen: torch.Generator) -> tuple[torch.Tensor, float]:
    """A ``[1, n]`` verify-cost row and a draft cost: a convex increasing curve, positive noise with no
    shape (the rule must still follow its definition), a decreasing curve, or the published Qwen3-8B A800 curve read as a
    function of the total number of slots (extended linearly past its 512 nodes)."""
    i = torch.arange(n, dtype=torch.float64)
    if kind == "convex":
        a, b, c = 0.5 + float(torch.rand(1, generator=gen)), 0.02 * float(torch.rand(1, generator=gen)), 1e-4
        return (a + b * i + c * i * i).float()[None], 0.05 * float(torch.rand(1, generator=gen))
    if kind == "random":
        return (0.01 + torch.rand(1, n, generator=gen)), 0.0
    if kind == "decreasing":  # Theta grows past every request's last node: the cap "or all it has" decides
        return (0.5 + 1.0 / (1.0 + i)).float()[None], 0.0
    model = a800_curves()["models"]["Qwen3-8B"] if "Qwen3-8B" in a800_curves()["models"] else \
        next(iter(a800_curves()["models"].values()))
    curve = torch.tensor(next(iter(model["verify_cost"].values())), dtype=torch.float64)
    slope = float(curve[-1] - curve[-2])
    extra = curve[-1] + slope * torch.arange(1, max(0, n - len(curve)) + 1, dtype=torch.float64)
    return torch.cat([curve, extra])[:n].float()[None], float(model["draft_cost"])


def expected_tree(logprobs, token_ids, roots, ctx, N, cuts) -> dict:
    """The reference trees: request b keeps the first cuts[b] nodes of its fixed-budget tree (N nodes),
    the slots past them take the unused-slot values of ops.h, and expected_tokens is that of the
    cuts[b]-node tree."""
    want = ref.build_tree(logprobs, token_ids, roots, ctx, N)
    unused = {"tokens": 0, "parents": -1, "depths": 0, "scores": -math.inf, "tree_mask": 0}
    for b, c in enumerate(cuts):
        for name, value in unused.items():
            want[name][b, c + 1:] = value
        want["positions"][b, c + 1:] = ctx[b]
        want["num_nodes"][b] = c
        one = ref.build_tree(logprobs[b:b + 1], token_ids[b:b + 1], roots[b:b + 1], ctx[b:b + 1], c)
        want["expected_tokens"][b] = one["expected_tokens"][0]
    return want


def theta_of(scores, cost, draft_cost, mode, cuts):
    """Theta of a given allocation, in double: (B + mass of the kept nodes) / (draft + cost of the size)."""
    mass = len(scores) + math.fsum(ref._exp(float(s)) for row, c in zip(scores, cuts) for s in row[:c])
    size = max(cuts) if mode == "batch" else sum(cuts)
    return mass / (draft_cost + float(cost[size]))


def check_cuts(got, scores, cost, draft_cost, mode):
    """got must be the contract's allocation, or one the exact reference rates within a near-tie."""
    want = ref.batch_budget_cuts(scores, cost, draft_cost, mode)
    if got != want:
        t_got, t_want = (theta_of(scores, cost, draft_cost, mode, c) for c in (got, want))
        assert abs(t_got - t_want) <= NEAR_TIE * t_want, f"cuts {got} vs reference {want}"


CASES = [  # (B, D, K, N)
    (1, 1, 1, 0), (1, 3, 4, 1), (2, 1, 5, 7), (3, 4, 3, 16), (4, 6, 8, 64), (8, 15, 8, 48), (5, 2, 2, 300),
    (8, 8, 16, 130), (3, 2, 1, 20),
]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("B,D,K,N", CASES)
@pytest.mark.parametrize("kind", LOGIT_KINDS)
@pytest.mark.parametrize("cost_kind", ("convex", "random", "decreasing", "a800"))
def test_matches_reference(device, mode, B, D, K, N, kind, cost_kind):
    gen = torch.Generator().manual_seed(seed_of(mode, B, D, K, N, kind, cost_kind))
    logprobs, token_ids, roots, ctx = make_inputs(B, D, K, kind, gen)
    cost, draft_cost = cost_row(cost_kind, (B * N if mode == "ragged" else N) + 1, gen)
    args = [t.to(device) for t in (logprobs, token_ids, roots, ctx)]
    tree = ddtree.build_tree(*args, N, cost.to(device), draft_cost, mode).to("cpu")
    full = ref.build_tree(logprobs, token_ids, roots, ctx, N)
    scores = [full["scores"][b, 1: int(full["num_nodes"][b]) + 1].tolist() for b in range(B)]
    cuts = tree.num_nodes.tolist()
    check_cuts(cuts, scores, cost[0].tolist(), draft_cost, mode)
    want = expected_tree(logprobs, token_ids, roots, ctx, N, cuts)
    for name, value in want.items():
        got = getattr(tree, name)
        assert got.dtype == value.dtype and torch.equal(got, value), f"{name}: got {got}\nexpected {value}"


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("seed", range(6))
def test_batch_of_one_is_request_mode(device, seed):
    """At B = 1 the batch's surrogate is the request's own: both modes equal per-request CaDDTree."""
    gen = torch.Generator().manual_seed(seed)
    N = int(torch.randint(0, 200, (1,), generator=gen))
    logprobs, token_ids, roots, ctx = (t.to(device) for t in make_inputs(1, 6, 8, LOGIT_KINDS[seed % 3], gen))
    cost, draft_cost = cost_row(("convex", "random", "a800")[seed % 3], N + 1, gen)
    per_request = ddtree.build_tree(logprobs, token_ids, roots, ctx, N, cost.to(device), draft_cost, "request")
    for mode in MODES:
        tree = ddtree.build_tree(logprobs, token_ids, roots, ctx, N, cost.to(device), draft_cost, mode)
        for name in ("num_nodes", "tokens", "parents", "scores", "tree_mask", "expected_tokens"):
            assert torch.equal(getattr(tree, name), getattr(per_request, name)), (mode, name)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("seed", range(8))
def test_maximises_batch_throughput(mode, seed):
    """With sorted marginals (every topk_marginals output) and a convex increasing cost, Theta is
    unimodal along the greedy order, so the rule's choice is the best allocation of its family: no
    common n (batch) and no number of best nodes t (ragged) gives the batch a higher Theta."""
    gen = torch.Generator().manual_seed(100 + seed)
    B, N = int(torch.randint(1, 9, (1,), generator=gen)), int(torch.randint(1, 80, (1,), generator=gen))
    logprobs, token_ids, roots, ctx = make_inputs(B, 8, 6, "normal", gen)
    cost, draft_cost = cost_row("convex", (B * N if mode == "ragged" else N) + 1, gen)
    tree = ddtree.build_tree(logprobs, token_ids, roots, ctx, N, cost, draft_cost, mode)
    full = ddtree.build_tree(logprobs, token_ids, roots, ctx, N)
    scores = [full.scores[b, 1: int(full.num_nodes[b]) + 1].tolist() for b in range(B)]
    best = theta_of(scores, cost[0], draft_cost, mode, tree.num_nodes.tolist())
    if mode == "batch":
        others = [[min(n, len(r)) for r in scores] for n in range(N + 1)]
    else:  # the t most probable nodes of the whole batch, for every t
        flat = sorted(((s, b) for b, r in enumerate(scores) for s in r), key=lambda x: (-x[0], x[1]))
        others = [[sum(1 for _, b2 in flat[:t] if b2 == b) for b in range(B)] for t in range(len(flat) + 1)]
    for cuts in others:
        assert theta_of(scores, cost[0], draft_cost, mode, cuts) <= best * (1 + NEAR_TIE), cuts


def test_ragged_takes_the_batch_most_probable_nodes():
    """ragged spends the slots where they buy the most: a confident request gets more nodes than an
    uncertain one, where one common n (batch) cannot tell them apart."""
    gen = torch.Generator().manual_seed(7)
    V, D = 50, 6
    logits = torch.randn(2, D, V, generator=gen)
    logits[0] *= 8.0  # request 0: peaked marginals; request 1: flat ones
    logits[1] *= 0.1
    lp, ids = ddtree.topk_marginals(logits, 8)
    roots, ctx = torch.tensor([1, 2]), torch.tensor([10, 20])
    N = 32
    cost = (1.0 + 0.02 * torch.arange(2 * N + 1.0))[None]
    tree = ddtree.build_tree(lp, ids, roots, ctx, N, cost, 0.0, "ragged")
    n0, n1 = tree.num_nodes.tolist()
    assert n0 > n1 >= 0
    # Every kept node is at least as probable as every dropped one of the other request.
    full = ddtree.build_tree(lp, ids, roots, ctx, N)
    kept = [full.scores[b, 1: tree.num_nodes[b] + 1] for b in range(2)]
    dropped = [full.scores[b, tree.num_nodes[b] + 1: full.num_nodes[b] + 1] for b in range(2)]
    for b in range(2):
        if len(kept[b]) and len(dropped[1 - b]):
            assert kept[b].min() >= dropped[1 - b].max()


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("B", (2, 3, 8))
def test_ragged_ties_go_to_the_smaller_request(device, B):
    """Identical requests tie on every node: the merge hands each tie to the smaller request index, so
    t nodes go round-robin from request 0."""
    gen = torch.Generator().manual_seed(B)
    logprobs, token_ids, roots, ctx = make_inputs(1, 5, 6, "normal", gen)
    rep = lambda t: t.expand(B, *t.shape[1:]).contiguous().to(device)  # noqa: E731
    N = 12
    for t in range(B * N + 1):  # a flat cost up to t nodes, then a wall: the rule takes exactly t nodes
        cost = torch.full((1, B * N + 1), 1e6)
        cost[0, : t + 1] = 1.0
        tree = ddtree.build_tree(rep(logprobs), rep(token_ids), rep(roots), rep(ctx), N, cost.to(device), 0.0,
                                 "ragged")
        assert tree.num_nodes.tolist() == [t // B + (b < t % B) for b in range(B)], t


@pytest.mark.parametrize("device", devices())
def test_errors(device):
    lp, ids, roots, ctx = (t.to(device) for t in make_inputs(3, 4, 4, "normal", torch.Generator().manual_seed(1)))
    ok = torch.ones(1, 3 * 10 + 1, device=device)
    with pytest.raises(RuntimeError, match="budget_mode must be 'request', 'batch' or 'ragged', got 'padded'"):
        ddtree.build_tree(lp, ids, roots, ctx, 10, ok, 0.0, "padded")
    for mode in MODES:
        with pytest.raises(RuntimeError, match=f"budget_mode '{mode}' prices the whole batch and needs verify_cost"):
            ddtree.build_tree(lp, ids, roots, ctx, 10, None, 0.0, mode)
        with pytest.raises(RuntimeError, match=r"verify_cost.size\(0\) must equal 1"):
            ddtree.build_tree(lp, ids, roots, ctx, 10, torch.ones(3, 31, device=device), 0.0, mode)
    with pytest.raises(RuntimeError, match=r"at least B \* max_nodes \+ 1 \(31\) columns for budget_mode 'ragged', got 11"):
        ddtree.build_tree(lp, ids, roots, ctx, 10, torch.ones(1, 11, device=device), 0.0, "ragged")
    with pytest.raises(RuntimeError, match=r"at least max_nodes \+ 1 \(11\) columns for budget_mode 'batch', got 10"):
        ddtree.build_tree(lp, ids, roots, ctx, 10, torch.ones(1, 10, device=device), 0.0, "batch")
    with pytest.raises(RuntimeError, match=r"verify_cost.size\(0\) must equal the batch size"):
        ddtree.build_tree(lp, ids, roots, ctx, 10, torch.ones(1, 11, device=device), 0.0, "request")
    if device == "cpu":  # value checks need the data: CPU only (ops.h)
        bad = ok.clone()
        bad[0, 25] = 0.0
        with pytest.raises(RuntimeError, match=r"draft_cost \+ verify_cost\[0, 25\] = 0 must be finite and positive"):
            ddtree.build_tree(lp, ids, roots, ctx, 10, bad, 0.0, "ragged")
        ddtree.build_tree(lp, ids, roots, ctx, 10, bad, 0.0, "batch")  # column 25 is past batch's N + 1
