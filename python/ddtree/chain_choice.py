"""CaDDTree's step-wide choice between the tree it built and the drafter's top-1 chain.

A tree of ``n`` nodes accepts at least as much as the chain of its most probable path, but an engine may
verify the chain more cheaply: in vLLM a chain is its own causal step (vLLM's attention kernel, its
rejection sampler, the accepted tokens already in place), a tree needs the plugin's tree call, mask and
KV moves. So where the cost model measures chains apart (:attr:`ddtree.cost.CostModel.chain`), the
batch's step is priced both ways, by the surrogate throughput CaDDTree already maximises:

* the tree: ``sum_b E_b / (Cd + Cv_tree)``, ``E_b`` its expected tokens (``build_tree``'s
  ``expected_tokens``: 1 + the chosen nodes' path probabilities), ``Cv_tree`` the step's tree cost;
* the chain of ``k`` tokens, ``k = 0..D``: ``sum_b (1 + sum_{d<=k} P_b(d)) / (Cd + Cv_chain(k))``, with
  ``P_b(d) = prod_{i<=d} p_b(i)`` the path probability of the top-1 tokens to depth ``d`` (``k = 0``: no
  draft, a plain step).

The largest wins; on a tie the tree (it accepts as much and is what the budget chose). All tensor ops on
the marginals' device, no host read: the caller reads the choice with the step's drafts.
"""
from __future__ import annotations

import torch


def chain_expected_tokens(top1_logprobs: torch.Tensor) -> torch.Tensor:
    """``[B, D]`` log-probabilities of each depth's top-1 token -> ``[D + 1]`` the batch's expected tokens
    with a chain of ``k = 0..D`` tokens: ``B + sum_b sum_{d <= k} P_b(d)``. A non-finite log-probability
    (``-inf``: no such token; NaN: a broken drafter) counts as probability 0 from that depth on."""
    lp = torch.nan_to_num(top1_logprobs.float(), nan=float("-inf"), posinf=0.0).clamp(max=0.0)
    path = torch.cumsum(lp, dim=1).exp()  # [B, D]: P_b(d), non-increasing in d
    B = lp.shape[0]
    per_k = torch.cumsum(path.sum(dim=0), dim=0)  # [D]: sum_b sum_{d <= k} P_b(d)
    return torch.cat([per_k.new_zeros(1), per_k]) + B


def chain_or_tree(top1_logprobs: torch.Tensor, tree_expected: torch.Tensor, tree_cost: torch.Tensor,
                  chain_cost: torch.Tensor, draft_cost: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Whether the step drafts the chain instead of the tree, and the chain's length.

    top1_logprobs ``[B, D]``; tree_expected ``[B]``; tree_cost: the step's tree verify cost (ms, one
    element); chain_cost ``[>= D + 1]`` ``Cv_chain(k)`` (ms) for ``k = 0..D``; draft_cost ``Cd`` (ms).
    Returns (use_chain: 0-d bool, k: 0-d int64, the best chain's length; 0 means no draft).
    """
    if top1_logprobs.dim() != 2:
        raise ValueError(f"top1_logprobs must be [B, D], got shape {list(top1_logprobs.shape)}")
    B, D = top1_logprobs.shape
    if tree_expected.shape != (B,):
        raise ValueError(f"tree_expected must be [B] = [{B}], got shape {list(tree_expected.shape)}")
    if tree_cost.numel() != 1:
        raise ValueError(f"tree_cost must hold one cost, got shape {list(tree_cost.shape)}")
    if chain_cost.dim() != 1 or chain_cost.shape[0] < D + 1:
        raise ValueError(f"chain_cost must be [>= D + 1] = [>= {D + 1}], got shape {list(chain_cost.shape)}")
    chain = chain_expected_tokens(top1_logprobs) / (draft_cost + chain_cost[: D + 1].float())
    k = torch.argmax(chain)  # the first maximum: the shortest of equally good chains
    tree = tree_expected.float().sum() / (draft_cost + tree_cost.float().reshape(()))
    return chain[k] > tree, k
