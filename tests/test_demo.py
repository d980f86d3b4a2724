"""``ddtree demo``'s CaDDTree, checked as properties (no timing): its cost model prices a round's fixed
steps, every tree it verifies is the size that model says pays most (never a bigger one), and
:func:`ddtree.cost.round_overhead_ms` is a decode's round time less its verify forwards, per round."""
from __future__ import annotations

import numpy as np
import pytest

from ddtree import cost, decode, demo
from ddtree.decode import GenerateOutput, RoundStats


@pytest.mark.parametrize("block", sorted(demo.DRAFTERS))
def test_caddtree_trees_are_no_bigger_than_its_cost_model_says_pays(monkeypatch, tmp_path, block):
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
    results = demo.run(max_new_tokens=48, threads=None, drafter_block=block, out=lambda *_: None)
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


def _round(verify_ms: float) -> RoundStats:
    return RoundStats(accept_len=[3], tree_size=[5], draft_s=0.0, build_s=0.0, verify_s=verify_ms / 1e3, commit_s=0.0)


def test_round_overhead_is_the_rounds_time_less_their_verifies():
    # Three rounds in 15 ms of which 2 + 3 + 4 ms verified: 2 ms a round beyond the verify forwards.
    out = GenerateOutput([[1] * 9], [_round(2.0), _round(3.0), _round(4.0)], prefill_s=0.004, total_s=0.019)
    assert abs(cost.round_overhead_ms(out) - 2.0) < 1e-9
    # The prefill is not a round: a longer one changes nothing.
    out = GenerateOutput([[1] * 9], [_round(2.0), _round(3.0), _round(4.0)], prefill_s=0.104, total_s=0.119)
    assert abs(cost.round_overhead_ms(out) - 2.0) < 1e-9


def test_round_overhead_needs_a_round():
    with pytest.raises(ValueError, match="at least one round"):
        cost.round_overhead_ms(GenerateOutput([[1]], [], 0.0, 0.01))
