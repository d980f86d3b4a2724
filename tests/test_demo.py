"""``ddtree demo``'s CaDDTree, checked as properties (no timing): its cost model prices a round's fixed
steps, every tree it verifies is the size that model says pays most (never a bigger one), and
:func:`ddtree.cost.round_overhead_ms` is the decode's wall time less the model's verifies, per round."""
from __future__ import annotations

import numpy as np
import torch

from ddtree import cost, decode, demo
from ddtree.cost import CostModel
from ddtree.decode import GenerateOutput, RoundStats


def test_caddtree_trees_are_no_bigger_than_its_cost_model_says_pays(monkeypatch, tmp_path):
    monkeypatch.setenv("DDTREE_CACHE_DIR", str(tmp_path))  # the demo measures its cost model afresh
    calls, recording = [], [False]
    real_build, real_cost_model = decode.build_tree, demo.demo_cost_model

    def build_tree(logprobs, token_ids, roots, context_lens, max_nodes, verify_cost=None, draft_cost=0.0,
                   budget_mode="request"):
        tree = real_build(logprobs, token_ids, roots, context_lens, max_nodes, verify_cost, draft_cost, budget_mode)
        if recording[0] and verify_cost is not None:  # CaDDTree's rounds in the demo's own decodes
            calls.append((logprobs, token_ids, roots, context_lens, max_nodes, verify_cost, draft_cost,
                          int(tree.num_nodes[0])))
        return tree

    def demo_cost_model(*args, **kwargs):  # record only after the cost model is measured
        model = real_cost_model(*args, **kwargs)
        recording[0] = True
        return model

    monkeypatch.setattr(decode, "build_tree", build_tree)
    monkeypatch.setattr(demo, "demo_cost_model", demo_cost_model)
    results = demo.run(max_new_tokens=48, threads=None, out=lambda *_: None)
    model = results["cost_model"]
    assert model.draft_cost > 0  # the round's fixed steps are priced
    assert calls
    for logprobs, token_ids, roots, context_lens, N, verify_cost, draft_cost, chosen in calls:
        assert draft_cost == model.draft_cost and verify_cost.shape == (1, N + 1)
        # DDTree's N most probable nodes; theta over every prefix of them, in float64.
        full = real_build(logprobs, token_ids, roots, context_lens, N)
        built = int(full.num_nodes[0])
        p = np.sort(np.exp(full.scores[0, 1 : built + 1].double().numpy()))[::-1]
        theta = (1 + np.concatenate([[0.0], np.cumsum(p)])) / (draft_cost + verify_cost[0, : built + 1].double().numpy())
        best = theta.max()
        assert theta[chosen] >= best * (1 - 1e-6), (chosen, theta)  # the chosen size pays most ...
        assert np.all(theta[chosen + 1 :] <= theta[chosen] * (1 + 1e-6)), (chosen, theta)  # ... no bigger one more
    # What was verified is what was chosen: the last timed decode's rounds are the last calls.
    sizes = [r.tree_size[0] for r in results["caddtree"].rounds]
    assert sizes == [c[-1] for c in calls[-len(sizes):]]


def _flat_model(verify_ms: float) -> CostModel:
    return CostModel([0, 64], [0, 4096], np.full((2, 2), verify_ms), 0.0)


def test_round_overhead_is_the_rounds_time_less_the_models_verifies():
    rounds = [RoundStats([3], [5], 0, 0, 0, 0), RoundStats([2], [9], 0, 0, 0, 0), RoundStats([4], [0], 0, 0, 0, 0)]
    out = GenerateOutput([[1] * 9], rounds, prefill_s=0.004, total_s=0.004 + 0.015)
    # Three rounds in 15 ms, each verify priced 2 ms: 3 ms a round beyond the verifies.
    assert abs(cost.round_overhead_ms(_flat_model(2.0), out, prompt_len=10) - 3.0) < 1e-9
    # A verify that grows with the context: the rounds run at contexts 10, 13 and 15 (prompt, then accepted).
    model = CostModel([0, 64], [0, 100], np.array([[1.0, 1.0], [11.0, 11.0]]), 0.0)  # Cv = 1 + l / 10
    want = (15.0 - (2.0 + 2.3 + 2.5)) / 3
    assert abs(cost.round_overhead_ms(model, out, prompt_len=10) - want) < 1e-9
    # Never negative: a model that prices more than the rounds took leaves nothing to price.
    assert cost.round_overhead_ms(_flat_model(10.0), out, prompt_len=10) == 0.0


def test_round_overhead_needs_a_batch_1_decode():
    import pytest

    two = GenerateOutput([[1], [1]], [RoundStats([2, 2], [3, 3], 0, 0, 0, 0)], 0.0, 0.01)
    with pytest.raises(ValueError, match="batch-1 decode"):
        cost.round_overhead_ms(_flat_model(1.0), two, prompt_len=4)
    with pytest.raises(ValueError, match="batch-1 decode"):
        cost.round_overhead_ms(_flat_model(1.0), GenerateOutput([[1]], [], 0.0, 0.01), prompt_len=4)
