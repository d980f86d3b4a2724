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

The marginals are a surrogate: a drafter's factorised marginals need not predict what a tree's extra
branches accept as well as what its top-1 path accepts. So each kind's expected *draft* tokens (past the
bonus token, which is certain) are scaled by what the engine measured for that kind,
:class:`AcceptanceScale`: accepted draft tokens over predicted ones, on the rounds priced so far.
"""
from __future__ import annotations

import torch


def _path_probs(top1_logprobs: torch.Tensor) -> torch.Tensor:
    """``[B, D]`` top-1 log-probabilities -> ``[B, D]`` path probabilities ``P_b(d)`` (non-increasing in d).
    A non-finite log-probability (``-inf``: no such token; NaN: a broken drafter) counts as probability 0
    from that depth on; one above 0 (rounding) as 1."""
    lp = torch.nan_to_num(top1_logprobs.float(), nan=float("-inf"), posinf=0.0).clamp(max=0.0)
    return torch.cumsum(lp, dim=1).exp()


def chain_expected_tokens(top1_logprobs: torch.Tensor) -> torch.Tensor:
    """``[B, D]`` log-probabilities of each depth's top-1 token -> ``[D + 1]`` the batch's expected tokens
    with a chain of ``k = 0..D`` tokens: ``B + sum_b sum_{d <= k} P_b(d)``."""
    per_k = torch.cumsum(_path_probs(top1_logprobs).sum(dim=0), dim=0)  # [D]: sum_b sum_{d <= k} P_b(d)
    return torch.nn.functional.pad(per_k, (1, 0)) + top1_logprobs.shape[0]


def chain_expected_per_request(top1_logprobs: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``[B]`` each request's expected tokens with the chain of ``k`` (0-d int tensor) top-1 tokens."""
    cum = torch.nn.functional.pad(torch.cumsum(_path_probs(top1_logprobs), dim=1), (1, 0))  # [B, D + 1]
    return 1.0 + cum.gather(1, k.reshape(1, 1).expand(cum.shape[0], 1)).squeeze(1)


def chain_or_tree(top1_logprobs: torch.Tensor, tree_expected: torch.Tensor, tree_cost: torch.Tensor,
                  chain_cost: torch.Tensor, draft_cost: float, tree_scale: float = 1.0,
                  chain_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Whether the step drafts the chain instead of the tree, and the chain's length.

    top1_logprobs ``[B, D]``; tree_expected ``[B]``; tree_cost: the step's tree verify cost (ms, one
    element); chain_cost ``[>= D + 1]`` ``Cv_chain(k)`` (ms) for ``k = 0..D``; draft_cost ``Cd`` (ms);
    tree_scale / chain_scale: each kind's expected draft tokens (expected tokens less ``B``) are multiplied
    by it (:class:`AcceptanceScale`; 1: the marginals as they are).
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
    if not (tree_scale >= 0 and chain_scale >= 0):
        raise ValueError(f"tree_scale and chain_scale must be non-negative, got {tree_scale}, {chain_scale}")
    expected = (chain_expected_tokens(top1_logprobs) - B) * chain_scale + B
    chain = expected / (draft_cost + chain_cost[: D + 1].float())
    k = torch.argmax(chain)  # the first maximum: the shortest of equally good chains
    tree = ((tree_expected.float().sum() - B) * tree_scale + B) / (draft_cost + tree_cost.float().reshape(()))
    return chain[k] > tree, k


class AcceptanceScale:
    """Accepted draft tokens over predicted ones, per kind of round ("tree", "chain"), as an engine
    measures them: a round's prediction is ``E_b - 1`` per request (its expected tokens less the bonus),
    what it accepted is the request's context growth over the step that verified it, less 1.

    The engine tells it, once a round, the batch's request ids and contexts (tokens before this step's) and
    the predictions of the drafts it proposes now (:meth:`round`); a draft proposed at round ``t`` is
    verified at ``t + 1``, whose context is known at ``t + 1`` and the verified one's growth at ``t + 2``.
    Sums decay by ``decay`` a measured round, so the scale follows a drift. A kind never measured, or
    measured on fewer than ``min_predicted`` predicted tokens, scales by 1.
    """

    def __init__(self, max_tokens: int, decay: float = 0.98, min_predicted: float = 8.0):
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1 (the most tokens a round commits), got {max_tokens}")
        self.max_tokens, self.decay, self.min_predicted = int(max_tokens), float(decay), float(min_predicted)
        self.predicted = {"tree": 0.0, "chain": 0.0}
        self.accepted = {"tree": 0.0, "chain": 0.0}
        self._proposed: dict = {}  # request -> (kind, predicted draft tokens): drafts to be verified next step
        self._verifying: dict = {}  # request -> (kind, predicted, context before the verifying step)

    def scale(self, kind: str) -> float:
        p = self.predicted[kind]
        return self.accepted[kind] / p if p > 0 and p >= self.min_predicted else 1.0

    def round(self, req_ids, contexts, kind: str | None = None, predicted=None) -> None:
        """One round: ``req_ids`` and ``contexts`` (host sequences, tokens before this step) of the batch,
        and, for a priced round, the kind drafted and each request's expected tokens (``predicted``)."""
        now = dict(zip(req_ids, (int(c) for c in contexts)))
        grew = {"tree": [0.0, 0.0], "chain": [0.0, 0.0]}
        for req, (k, pred, before) in self._verifying.items():
            got = now.get(req, -1) - before  # tokens the verifying step committed
            if 1 <= got <= self.max_tokens:  # else finished, preempted or cut: not a measurement
                grew[k][0] += pred
                grew[k][1] += got - 1
        for k, (pred, got) in grew.items():
            if pred > 0:
                self.predicted[k] = self.predicted[k] * self.decay + pred
                self.accepted[k] = self.accepted[k] * self.decay + got
        self._verifying = {req: (k, pred, now[req]) for req, (k, pred) in self._proposed.items() if req in now}
        self._proposed = {} if kind is None else {
            req: (kind, max(0.0, float(e) - 1.0)) for req, e in zip(req_ids, predicted)}
