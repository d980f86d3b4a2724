"""accept_tree against the reference walk (planted paths with a known answer, and random targets), and
compact_kv against clone-then-write (several layers of different shapes and dtypes, aliasing slots)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, strategies as st

import ddtree
import reference as ref
from conftest import devices
from inputs import context_lens, make_logits, random_cost, seed_of


def make_tree(B, D, K, max_nodes, gen, V=100, shrink=False):
    logprobs, ids = ref.topk_marginals(make_logits(B, D, V, torch.float32, "ties", gen), K)
    roots = torch.randint(0, V, (B,), generator=gen)
    cost = random_cost(B, max_nodes + 1, gen) if shrink else None
    return ddtree.build_tree(logprobs, ids, roots, context_lens(B, 50, gen), max_nodes, cost, 0.01)


def root_path(parents: torch.Tensor, slot: int) -> list[int]:
    path = [slot]
    while path[-1] != 0:
        path.append(int(parents[path[-1]]))
    return path[::-1]


def run_accept(device, tokens, parents, num_nodes, target, max_depth=-1):
    out = ddtree.accept_tree(tokens.to(device), parents.to(device), num_nodes.to(device), target.to(device), max_depth)
    return tuple(t.cpu() for t in out)


def assert_accept_equal(got, expected):
    for name, g, e in zip(("accepted_slots", "accept_len", "next_token"), got, expected):
        assert g.dtype == e.dtype and g.shape == e.shape, f"{name}: {g.dtype}{tuple(g.shape)} vs {e.dtype}{tuple(e.shape)}"
        assert torch.equal(g, e), f"{name}:\n got {g}\n expected {e}"


# --------------------------------------------------------------------------------------------------
# accept_tree


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("D,max_nodes", [(1, 0), (1, 1), (4, 16), (15, 16), (15, 300), (4, 300)])
@pytest.mark.parametrize("truncate", [False, True])
def test_planted_path(D, max_nodes, truncate, device):
    """Targets agree with the tree exactly along the root path to a chosen slot, and nowhere else: the
    walk must accept that path (cut to max_depth + 1 slots when max_depth is smaller) and return the
    target's token at its last slot."""
    gen = torch.Generator().manual_seed(seed_of(D, max_nodes, truncate))
    B, V = 8, 100
    tree = make_tree(B, D, 6, max_nodes, gen, V, shrink=(max_nodes == 300))
    target = torch.randint(V, 2 * V, tree.tokens.shape, generator=gen)  # no tree token is >= V
    max_depth = max(0, D // 2) if truncate else D
    paths = []
    for b in range(B):
        n = int(tree.num_nodes[b])
        path = root_path(tree.parents[b], int(torch.randint(0, n + 1, (1,), generator=gen)))
        for parent, child in zip(path, path[1:]):
            target[b, parent] = tree.tokens[b, child]
        paths.append(path[: max_depth + 1])
    got = run_accept(device, tree.tokens, tree.parents, tree.num_nodes, target, max_depth)
    assert_accept_equal(got, ref.accept_tree(tree.tokens, tree.parents, tree.num_nodes, target, max_depth))
    slots, length, nxt = got
    assert slots.shape == (B, min(max_depth + 1, max_nodes + 1))
    for b, path in enumerate(paths):
        assert int(length[b]) == len(path)
        assert slots[b].tolist() == path + [-1] * (slots.shape[1] - len(path))
        assert int(nxt[b]) == int(target[b, path[-1]])


@pytest.mark.parametrize("device", devices())
def test_random_targets_on_built_trees(device):
    gen = torch.Generator().manual_seed(4)
    tree = make_tree(8, 6, 3, 60, gen, V=4)  # tiny vocabulary: random targets often match
    for max_depth in (-1, 0, 2, 6, 100):
        target = torch.randint(0, 4, tree.tokens.shape, generator=gen)
        got = run_accept(device, tree.tokens, tree.parents, tree.num_nodes, target, max_depth)
        assert_accept_equal(got, ref.accept_tree(tree.tokens, tree.parents, tree.num_nodes, target, max_depth))
    assert (got[1] > 1).any(), "the test should accept something"


@pytest.mark.parametrize("device", devices())
def test_smallest_matching_child_and_num_nodes(device):
    """Two children of the root carry the target token: the smaller slot wins. A matching node past
    num_nodes (an unused slot) is never taken."""
    tokens = torch.tensor([[9, 5, 5, 7, 7]])
    parents = torch.tensor([[-1, 0, 0, 2, 1]], dtype=torch.int32)
    target = torch.tensor([[5, 7, 7, 1, 2]])
    got = run_accept(device, tokens, parents, torch.tensor([3], dtype=torch.int32), target)
    # Slot 1 (smallest child of the root with token 5), whose only child (slot 4) is past num_nodes.
    assert_accept_equal(got, (torch.tensor([[0, 1, -1, -1, -1]]), torch.tensor([2], dtype=torch.int32),
                              torch.tensor([7])))
    got = run_accept(device, tokens, parents, torch.tensor([4], dtype=torch.int32), target)
    assert_accept_equal(got, (torch.tensor([[0, 1, 4, -1, -1]]), torch.tensor([3], dtype=torch.int32),
                              torch.tensor([2])))


@st.composite
def random_trees(draw):
    """Arbitrary valid trees (parents[j] < j), tokens from a tiny vocabulary (duplicate siblings)."""
    B, T = draw(st.integers(1, 4)), draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    num_nodes = torch.randint(0, T, (B,), generator=gen, dtype=torch.int32)
    parents = torch.full((B, T), -1, dtype=torch.int32)
    for j in range(1, T):
        parents[:, j] = torch.randint(0, j, (B,), generator=gen, dtype=torch.int32)
    tokens = torch.randint(0, 3, (B, T), generator=gen)
    target = torch.randint(0, 3, (B, T), generator=gen)
    return tokens, parents, num_nodes, target, draw(st.integers(-1, T + 2))


@given(random_trees())
def test_random_trees(case):
    got = run_accept("cpu", *case)
    assert_accept_equal(got, ref.accept_tree(*case))


# --------------------------------------------------------------------------------------------------
# compact_kv

LAYERS = [(2, 64, torch.float32), (4, 16, torch.bfloat16), (1, 7, torch.float16), (3, 128, torch.bfloat16)]


def make_caches(B, S, gen, device):
    """One cache per entry of LAYERS (H, d, dtype), plus a head-slice view of a larger cache (strided)."""
    caches = [torch.randn(B, H, S, d, generator=gen).to(dtype) for H, d, dtype in LAYERS]
    big = torch.randn(B, 5, S + 3, 32, generator=gen)
    return [c.to(device) for c in caches] + [big.to(device)[:, 1:4, 2:]]


def run_compact(device, B, S, ctx, slots, alen, gen):
    caches = make_caches(B, S, gen, device)
    expected = ref.compact_kv([c.cpu() for c in caches], ctx, slots, alen)
    before_base = caches[-1]._base.clone() if caches[-1]._base is not None else None
    ddtree.compact_kv(caches, ctx.to(device), slots.to(device), alen.to(device))
    for i, (c, e) in enumerate(zip(caches, expected)):
        assert torch.equal(c.cpu(), e), f"cache {i} differs at {(c.cpu() != e).nonzero()[:5].tolist()}"
    if before_base is not None:  # the view was written in place, and nothing outside it
        base = caches[-1]._base
        outside = torch.ones_like(base, dtype=torch.bool)
        outside[:, 1:4, 2:] = False
        assert torch.equal(base[outside], before_base[outside])


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("B,D,max_nodes", [(1, 1, 0), (3, 4, 16), (8, 15, 300), (8, 4, 40)])
def test_after_accept(B, D, max_nodes, device):
    """The commit of a real round: accepted paths from accept_tree on built trees."""
    gen = torch.Generator().manual_seed(seed_of(B, D, max_nodes))
    tree = make_tree(B, D, 4, max_nodes, gen, V=5)
    target = torch.randint(0, 5, tree.tokens.shape, generator=gen)
    slots, alen, _ = ddtree.accept_tree(tree.tokens, tree.parents, tree.num_nodes, target, D)
    ctx = context_lens(B, 30, gen)
    run_compact(device, B, 30 + max_nodes + 1, ctx, slots, alen, gen)


@pytest.mark.parametrize("device", devices())
def test_aliasing_slots(device):
    """Reads and writes overlap: a plain in-place loop would copy an already-moved entry."""
    gen = torch.Generator().manual_seed(9)
    slots = torch.tensor([[0, 3, 1, 2, 5],   # position ctx+2 must get the OLD ctx+1, which ctx+1 overwrites
                          [4, 3, 2, 1, 0],   # full reversal
                          [1, 2, 3, 4, 5],   # each read is the next write: a backward loop would break
                          [0, 1, 2, 3, 4]])  # identity
    alen = torch.tensor([5, 5, 5, 5], dtype=torch.int32)
    run_compact(device, 4, 20, torch.tensor([0, 7, 3, 14]), slots, alen, gen)


@pytest.mark.parametrize("device", devices())
def test_accept_len_zero_and_full(device):
    gen = torch.Generator().manual_seed(10)
    slots = torch.tensor([[0, 2, 5, -1], [0, 1, 2, 3], [0, -1, -1, -1]])  # -1 padding past accept_len
    alen = torch.tensor([0, 4, 1], dtype=torch.int32)
    run_compact(device, 3, 12, torch.tensor([3, 8, 11]), slots, alen, gen)


@pytest.mark.parametrize("device", devices())
def test_empty_cache_list(device):
    ddtree.compact_kv([], torch.zeros(2, dtype=torch.long, device=device),
                      torch.zeros(2, 3, dtype=torch.long, device=device),
                      torch.ones(2, dtype=torch.int32, device=device))
