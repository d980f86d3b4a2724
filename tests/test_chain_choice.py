"""CaDDTree's step-wide chain-or-tree choice (ddtree.chain_choice) against a brute-force reference, and the
cost model's chain curves (JSON round trip, validation). CPU only."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

from ddtree import ops
from ddtree.chain_choice import AcceptanceScale, chain_expected_per_request, chain_expected_tokens, chain_or_tree
from ddtree.cost import CostModel


def _reference(top1: np.ndarray, tree_expected: np.ndarray, tree_cost: float, chain_cost: np.ndarray,
               draft: float, tree_scale: float = 1.0, chain_scale: float = 1.0) -> tuple[bool, int]:
    """Python loops in float64: every chain length's batch throughput against the tree's, each kind's
    draft tokens (past the certain bonus token) scaled."""
    B, D = top1.shape
    best_k, best = 0, -math.inf
    for k in range(D + 1):
        expected = 0.0
        for b in range(B):
            expected += 1.0
            path = 0.0
            for d in range(k):
                lp = top1[b, d]
                path = -math.inf if (math.isnan(lp) or path == -math.inf) else path + min(lp, 0.0)
                expected += chain_scale * math.exp(path) if path > -math.inf else 0.0
        theta = expected / (draft + chain_cost[k])
        if theta > best * (1 + 1e-6):  # the first of (float32-)equal maxima
            best_k, best = k, theta
    tree = (B + tree_scale * (tree_expected.sum() - B)) / (draft + tree_cost)
    return best > tree * (1 + 1e-6), best_k


def _margin_ok(top1, tree_expected, tree_cost, chain_cost, draft, tree_scale, chain_scale) -> bool:
    """Whether no two candidates are within float32 rounding of each other (else either answer is right)."""
    B = top1.shape[0]
    E = B + chain_scale * (chain_expected_tokens(torch.tensor(top1, dtype=torch.float32)).double().numpy() - B)
    tree = (B + tree_scale * (tree_expected.sum() - B)) / (draft + tree_cost)
    thetas = sorted(np.append(E / (draft + chain_cost[: len(E)]), tree))
    return thetas[-1] - thetas[-2] > 1e-4 * thetas[-1]


@given(B=st.integers(1, 6), D=st.integers(1, 9), seed=st.integers(0, 2**31 - 1), sharp=st.floats(0.1, 8.0),
       tree_cost=st.floats(0.1, 50.0), draft=st.floats(0.0, 10.0), slope=st.floats(0.0, 5.0),
       tree_scale=st.sampled_from([1.0, 0.0, 0.5, 1.7]), chain_scale=st.sampled_from([1.0, 0.3, 1.2]))
def test_chain_or_tree_matches_the_reference(B, D, seed, sharp, tree_cost, draft, slope, tree_scale, chain_scale):
    g = torch.Generator().manual_seed(seed)
    top1 = torch.log_softmax(torch.randn(B, D, 5, generator=g) * sharp, dim=-1).max(dim=-1).values
    tree_expected = 1 + torch.rand(B, generator=g) * D
    chain_cost = 1.0 + slope * torch.arange(D + 1, dtype=torch.float32) + torch.rand(D + 1, generator=g)
    chain_cost = torch.cummax(chain_cost, 0).values
    args = (top1.double().numpy(), tree_expected.double().numpy(), tree_cost, chain_cost.double().numpy(), draft,
            tree_scale, chain_scale)
    if not _margin_ok(*args):
        return
    use, k = chain_or_tree(top1, tree_expected, torch.tensor([tree_cost]), chain_cost, draft, tree_scale, chain_scale)
    want_use, want_k = _reference(*args)
    assert (bool(use), int(k)) == (want_use, want_k)
    # Each request's expected tokens with the chosen chain add up to the batch's.
    per_request = chain_expected_per_request(top1, k)
    assert float(per_request.sum()) == pytest.approx(float(chain_expected_tokens(top1)[k]), rel=1e-5)


def test_chain_expected_tokens_by_hand():
    # One request, top-1 probabilities 0.5, 0.5, 1: paths 0.5, 0.25, 0.25.
    lp = torch.log(torch.tensor([[0.5, 0.5, 1.0]]))
    assert chain_expected_tokens(lp).tolist() == pytest.approx([1.0, 1.5, 1.75, 2.0])
    # Two requests add; -inf and NaN end a request's path there (probability 0 from that depth on).
    lp = torch.tensor([[0.0, -math.inf, 0.0], [math.nan, 0.0, 0.0]])
    assert chain_expected_tokens(lp).tolist() == pytest.approx([2.0, 3.0, 3.0, 3.0])
    # A log-probability above 0 (rounding in the marginals) counts as probability 1, never more.
    assert chain_expected_tokens(torch.tensor([[1e-6, 0.5]])).tolist() == pytest.approx([1.0, 2.0, 3.0])


def test_ties_go_to_the_tree_and_to_the_shorter_chain():
    top1 = torch.zeros(1, 3)  # certain drafts: a chain of k accepts k + 1
    flat = torch.full((4,), 2.0)  # every chain costs the same: the longest wins
    use, k = chain_or_tree(top1, torch.tensor([4.0]), torch.tensor([2.0]), flat, 0.0)
    assert not bool(use) and int(k) == 3  # the tree's 4 tokens at 2 ms tie the chain of 3: the tree
    use, k = chain_or_tree(top1, torch.tensor([4.0]), torch.tensor([2.5]), flat, 0.0)
    assert bool(use) and int(k) == 3
    # Uncertain drafts whose chain gains nothing past depth 1 (probability 0 there): k = 1, not 2 or 3.
    lp = torch.tensor([[0.0, -math.inf, -math.inf]])
    use, k = chain_or_tree(lp, torch.tensor([1.0]), torch.tensor([9.0]), flat, 0.0)
    assert bool(use) and int(k) == 1


def test_no_draft_when_drafting_never_pays():
    # Drafts almost surely wrong and every draft token dear: the plain step (k = 0) is the chain chosen,
    # and it beats the tree, so the step drafts nothing.
    lp = torch.full((4, 7), -20.0)
    cost = 5.0 + 3.0 * torch.arange(8, dtype=torch.float32)
    use, k = chain_or_tree(lp, torch.full((4,), 1.01), torch.tensor([8.0]), cost, 1.0)
    assert bool(use) and int(k) == 0


def test_with_build_tree_expected_tokens():
    # The tree's expected tokens bound the chain's from above at as many nodes: with equal costs the
    # chain never wins; with a dearer tree it does.
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 6, 50, generator=g) * 3
    logprobs, token_ids = ops.topk_marginals(logits, 6)
    tree = ops.build_tree(logprobs, token_ids, torch.zeros(3, dtype=torch.long), torch.full((3,), 10), 6)
    chain_E = chain_expected_tokens(logprobs[:, :, 0])
    assert float(tree.expected_tokens.sum()) >= float(chain_E[6]) * (1 - 1e-6)
    cost = torch.full((7,), 3.0)
    use, _ = chain_or_tree(logprobs[:, :, 0], tree.expected_tokens, torch.tensor([3.0]), cost, 1.0)
    assert not bool(use)
    use, k = chain_or_tree(logprobs[:, :, 0], tree.expected_tokens, torch.tensor([30.0]), cost, 1.0)
    assert bool(use) and int(k) == 6


def test_acceptance_scale_measures_each_kind_over_the_right_step():
    # Round t proposes drafts; step t + 1 verifies them; its growth is known at round t + 2.
    scale = AcceptanceScale(max_tokens=8, decay=1.0, min_predicted=0.0)
    ids = ["a", "b"]
    scale.round(ids, [10, 20], "tree", [5.0, 3.0])  # round 0: predicts 4 + 2 draft tokens
    scale.round(ids, [11, 21], "chain", [4.0, 4.0])  # round 1: step 1 verifies round 0's (contexts before it)
    assert scale.predicted == {"tree": 0.0, "chain": 0.0}  # not measured yet
    scale.round(ids, [15, 23])  # round 2 (unpriced): step 1 committed 4 and 2 tokens: 3 + 1 draft tokens
    assert scale.predicted["tree"] == 6.0 and scale.accepted["tree"] == 4.0
    assert scale.scale("tree") == pytest.approx(4 / 6) and scale.scale("chain") == 1.0
    scale.round(ids, [20, 30])  # step 2 verified round 1's chains: 5 and 7 tokens: 4 + 6 draft, predicted 3 + 3
    assert scale.scale("chain") == pytest.approx(10 / 6)
    scale.round(ids, [21, 31])  # round 2 was unpriced: nothing measured
    assert (scale.predicted, scale.accepted) == ({"tree": 6.0, "chain": 6.0}, {"tree": 4.0, "chain": 10.0})


def test_acceptance_scale_skips_what_is_not_a_measurement():
    scale = AcceptanceScale(max_tokens=8, decay=1.0, min_predicted=0.0)
    scale.round(["a", "b", "c", "d"], [10, 20, 30, 40], "tree", [3.0] * 4)
    scale.round(["a", "b", "c", "d"], [11, 21, 31, 41])
    # a finished (gone), b preempted (context back to 0), c grew past a round's most (a prompt chunk): none
    # counts; d committed 3 tokens: 2 draft tokens of the 2 predicted.
    scale.round(["b", "c", "d"], [0, 60, 44])
    assert scale.predicted["tree"] == 2.0 and scale.accepted["tree"] == 2.0
    # Too little measured: the scale stays 1.
    few = AcceptanceScale(max_tokens=8, decay=1.0)
    few.round(["a"], [10], "chain", [2.0])
    few.round(["a"], [11])
    few.round(["a"], [12])
    assert few.predicted["chain"] == 1.0 and few.accepted["chain"] == 0.0 and few.scale("chain") == 1.0
    # Decay: older rounds weigh less.
    d = AcceptanceScale(max_tokens=8, decay=0.5, min_predicted=0.0)
    for ctx in ([10], [11], [13]):
        d.round(["a"], ctx, "tree", [3.0])
    assert d.predicted["tree"] == 2.0 and d.accepted["tree"] == 1.0
    d.round(["a"], [16], "tree", [3.0])  # the second round's draft committed 3: 2 of 2
    assert d.predicted["tree"] == 3.0 and d.accepted["tree"] == 2.5
    with pytest.raises(ValueError, match="max_tokens"):
        AcceptanceScale(0)


def test_a_kind_measured_below_its_prediction_loses_the_choice():
    # Certain-looking branches the engine found to accept half of what they promise: a tree 10% ahead on
    # the marginals (same cost) loses to the chain once its draft tokens are scaled by 0.5.
    top1 = torch.zeros(1, 3)  # chain of 3: 4 expected tokens
    cost = torch.full((4,), 2.0)
    use, _ = chain_or_tree(top1, torch.tensor([4.4]), torch.tensor([2.0]), cost, 0.0)
    assert not bool(use)
    use, k = chain_or_tree(top1, torch.tensor([4.4]), torch.tensor([2.0]), cost, 0.0, tree_scale=0.5)
    assert bool(use) and int(k) == 3
    with pytest.raises(ValueError, match="tree_scale"):
        chain_or_tree(top1, torch.tensor([4.4]), torch.tensor([2.0]), cost, 0.0, tree_scale=float("nan"))


def test_bad_shapes_are_refused_by_name():
    top1 = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="top1_logprobs"):
        chain_or_tree(torch.zeros(3), torch.ones(2), torch.ones(1), torch.ones(4), 0.0)
    with pytest.raises(ValueError, match="tree_expected"):
        chain_or_tree(top1, torch.ones(3), torch.ones(1), torch.ones(4), 0.0)
    with pytest.raises(ValueError, match="tree_cost"):
        chain_or_tree(top1, torch.ones(2), torch.ones(2), torch.ones(4), 0.0)
    with pytest.raises(ValueError, match="chain_cost"):
        chain_or_tree(top1, torch.ones(2), torch.ones(1), torch.ones(3), 0.0)


# ---- the cost model's chain curves -----------------------------------------------------------------


def _model(chain=None, batch=True):
    sizes = [1, 4] if batch else None
    bv = np.array([[[6.0, 7.0, 9.0]]]) if batch else None
    return CostModel([0, 2, 4], [128], np.array([[5.0, 6.0, 6.5]]), 1.5, batch_sizes=sizes, batch_verify_ms=bv,
                     batch_draft_ms=[2.0] if batch else None, chain=chain)


def _chain(batch=True):
    sizes = [1, 4] if batch else None
    bv = np.array([[[6.0, 6.2, 6.5, 7.0]]]) if batch else None
    return CostModel([0, 1, 3, 7], [128], np.array([[5.0, 5.0, 5.1, 5.2]]), 1.5, batch_sizes=sizes,
                     batch_verify_ms=bv, batch_draft_ms=[2.0] if batch else None)


def test_chain_curves_round_trip_and_price_batches(tmp_path):
    model = _model(_chain())
    path = tmp_path / "m.json"
    model.save(path)
    back = CostModel.load(path)
    assert back.chain is not None and back.chain.node_grid == [0, 1, 3, 7]
    assert back.chain.batch_verify_ms.tolist() == model.chain.batch_verify_ms.tolist()
    # Batch 4 reads the chain's batch-4 curve: 6.0 at k = 0, 6.5 at k = 3, linear between grid points.
    table = back.chain.table(torch.full((4,), 128), 7, 1024, mode="batch")[0]
    assert table[[0, 1, 3, 7]].tolist() == pytest.approx([6.0, 6.2, 6.5, 7.0])
    assert table[2].item() == pytest.approx(6.35)
    assert "chain" not in back.meta  # a core key, not carried as metadata
    assert CostModel.load(_save(tmp_path, _model())).chain is None  # without chains: none


def _save(tmp_path, model):
    path = tmp_path / "plain.json"
    model.save(path)
    return path


def test_chain_curves_must_match_the_model():
    with pytest.raises(ValueError, match="chain: its contexts and batch sizes"):
        _model(_chain(batch=False))
    with pytest.raises(ValueError, match="without a chain of its own"):
        _model(_model(_chain()))
    d = _model(_chain()).to_dict()
    d["chain"]["verify_ms"] = [[5.0, 4.0, 5.1, 5.2]]  # decreasing: refused, naming the chain
    with pytest.raises(ValueError, match="cost model 'chain'"):
        CostModel.from_dict(d)
