"""The plugin's per-request tree: a prefix of build_tree's slots is a tree, and a foreign draft is a chain."""
import pytest

pytest.importorskip("vllm.v1")  # the real vLLM (a namespace "vllm" would not have it)

import torch  # noqa: E402

from ddtree import ops  # noqa: E402
from ddtree.vllm.proposer import DraftTree  # noqa: E402


def ancestors(parents: list[int]) -> torch.Tensor:
    """Dense [n, n] mask, row i: i and its ancestors, from the parent list alone."""
    n = len(parents)
    dense = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        j = i
        while j >= 0:
            dense[i, j] = True
            j = parents[j]
    return dense


@pytest.mark.parametrize("seed", range(5))
def test_prefix_of_a_built_tree_is_a_tree(seed):
    g = torch.Generator().manual_seed(seed)
    D, V, N = 6, 40, 45  # N + 1 > 32: the mask spans two words, a prefix may need one
    logits = torch.randn(1, D, V, generator=g) * 3
    lp, ids = ops.topk_marginals(logits, 8)
    t = ops.build_tree(lp, ids, torch.tensor([7]), torch.tensor([0]), N)
    n = int(t.num_nodes)
    full = DraftTree(t.tokens[0, : n + 1].tolist(), t.parents[0, : n + 1], t.depths[0, : n + 1].long(),
                     t.tree_mask[0, : n + 1].contiguous())
    for k in (0, 1, 5, 31, 32, n):
        p = full.prefix(k)
        parents = p.parents.tolist()
        assert p.num_nodes == k and all(parents[j] < j for j in range(1, k + 1))
        assert p.mask.shape == (k + 1, (k + 1 + 31) // 32)
        assert torch.equal(p.mask, ops.pack_mask(ancestors(parents)))


def test_chain_is_the_causal_chain():
    c = DraftTree.chain(5, [9, 8, 7], "cpu")
    assert c.tokens == [5, 9, 8, 7]
    assert c.parents.tolist() == [-1, 0, 1, 2] and c.depths.tolist() == [0, 1, 2, 3]
    assert torch.equal(c.mask, ops.pack_mask(torch.ones(4, 4, dtype=torch.bool).tril()))
