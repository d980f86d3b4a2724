"""The runner's list of KV / hidden-state rows to move after a tree's walk (runner._moves), both ways it
is made: compact (the CPU path: only the rows that move) and fixed-size (the device path: every slot,
the rest copied onto themselves). Applied to a step's rows, both must leave each accepted path at slots
0..a-1 in order and every row a request owns but does not accept untouched where no path lands."""
import numpy as np
import pytest

pytest.importorskip("vllm.v1")

import torch  # noqa: E402

from ddtree import ops  # noqa: E402
from ddtree.vllm.runner import _moves, _Step  # noqa: E402


def walked_step(seed: int, B: int, N: int):
    """B real trees of up to N nodes, a target that agrees with random paths, the walk's result."""
    g = torch.Generator().manual_seed(seed)
    D, V = 6, 12
    lp, ids = ops.topk_marginals(torch.randn(B, D, V, generator=g) * 2, 4)
    roots = torch.randint(0, V, (B,), generator=g)
    tree = ops.build_tree(lp, ids, roots, torch.zeros(B, dtype=torch.long), N)
    ks = np.array([int(k) for k in torch.randint(0, N + 1, (B,), generator=g).minimum(tree.num_nodes)])
    T = int(ks.max()) + 1
    tokens = tree.tokens[:, :T].long()
    parents = tree.parents[:, :T].contiguous()
    # Each slot's target token: a random child's token (or a random token), so paths of every length occur.
    target = torch.randint(0, V, (B, T), generator=g)
    for b in range(B):
        for j in range(1, ks[b] + 1):
            if torch.rand(1, generator=g) < 0.8:
                target[b, int(parents[b, j])] = tokens[b, j]
    accepted, accept_len, _ = ops.accept_tree(tokens, parents, torch.from_numpy(ks).int(), target)
    step = _Step()
    q_lens = ks + 1
    step.is_tree = torch.from_numpy(ks > 0)
    step.own_slots = torch.from_numpy(np.arange(T)[None] < q_lens[:, None])
    return step, accepted, accept_len, q_lens


def apply(b, src, dst, rows):
    out = rows.clone()
    if b is not None:
        out[b, dst] = rows[b, src]  # every read before any write, as the runner's moves
    return out


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("B", [1, 5])
def test_both_move_lists_put_each_accepted_path_in_place(seed, B):
    step, accepted, accept_len, q_lens = walked_step(seed, B, N=9)
    T = accepted.shape[1]
    rows = torch.arange(B * T).view(B, T) + 1000  # a distinct value per (request, slot)
    compact = apply(*_moves(step, accepted, accept_len, compact=True), rows)
    fixed = apply(*_moves(step, accepted, accept_len, compact=False), rows)
    for b in range(B):
        a = int(accept_len[b])
        path = accepted[b, :a].tolist()
        assert path[0] == 0 and path == sorted(path)
        for moved in (compact, fixed):
            assert moved[b, :a].tolist() == rows[b, path].tolist()  # the path, in order, at slots 0..a-1
            assert torch.equal(moved[b, a:q_lens[b]], rows[b, a:q_lens[b]])  # the rest of its slots as they were
    b, src, dst = _moves(step, accepted, accept_len, compact=True)
    if b is not None:
        assert bool((src != dst).all())  # the compact list holds only real moves


def test_a_path_already_in_place_moves_nothing():
    step, accepted, accept_len, _ = walked_step(0, 1, N=4)
    accepted = torch.tensor([[0, 1, 2, -1, -1]])
    step.is_tree = torch.tensor([True])
    step.own_slots = torch.ones(1, 5, dtype=torch.bool)
    assert _moves(step, accepted, torch.tensor([3]), compact=True) == (None, None, None)
    b, src, dst = _moves(step, accepted, torch.tensor([3]), compact=False)
    assert torch.equal(src, dst)  # the fixed list copies every slot onto itself
