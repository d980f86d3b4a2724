"""The trees the runner verifies: the first k slots of build_tree's output (the scheduler may cut a draft)
are a tree with its mask in the first words, and a foreign draft is verified as the causal chain."""
import pytest

pytest.importorskip("vllm.v1")  # the real vLLM (a namespace "vllm" would not have it)

import torch  # noqa: E402

from ddtree import ops  # noqa: E402
from ddtree.vllm.attention import chain_mask  # noqa: E402


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
    for k in (0, 1, 5, 31, 32, n):  # the runner's slice of the first k nodes (runner._plan)
        parents = t.parents[0, : k + 1].tolist()
        mask = t.tree_mask[0, : k + 1, : (k + 1 + 31) // 32]
        assert all(parents[j] < j for j in range(1, k + 1))
        assert torch.equal(mask, ops.pack_mask(ancestors(parents)))
        depths = [0] * (k + 1)
        for j in range(1, k + 1):
            depths[j] = depths[parents[j]] + 1
        assert t.depths[0, : k + 1].tolist() == depths


def test_chain_is_the_causal_chain():
    assert torch.equal(chain_mask(4, "cpu"), ops.pack_mask(ancestors([-1, 0, 1, 2])))
