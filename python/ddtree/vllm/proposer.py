"""The DDTree / CaDDTree proposer: vLLM's DFlash drafter, whose per-position marginals become a tree.

vLLM's DFlash proposer runs the drafter once per round over the bonus token and ``D`` mask tokens and
takes the argmax at each mask position (a chain). This subclass keeps that forward (same inputs, same
drafter KV handling) but keeps the ``[B, D, V]`` logits and builds a tree of up to ``N`` nodes
(``num_speculative_tokens``) from them with ``topk_marginals`` + ``build_tree``: a fixed budget of ``N``
("ddtree") or the cost-aware budget capped at ``N`` ("caddtree"). The tree's node tokens go to the
scheduler as the request's draft (a list, so each request may draft a different number); the tree
itself stays with the runner, which verifies it (see :mod:`ddtree.vllm.runner`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from vllm.v1.spec_decode.dflash import DFlashProposer

from .. import ops
from .attention import chain_mask


@dataclass
class DraftTree:
    """One request's tree, slot 0 the root (the bonus token), slots in build_tree's (topological) order."""

    tokens: list[int]  # [1 + num_nodes]
    parents: torch.Tensor  # [1 + num_nodes] i32
    depths: torch.Tensor  # [1 + num_nodes] i64
    mask: torch.Tensor  # [1 + num_nodes, ceil((1 + num_nodes) / 32)] i32 ancestor bits (self included)

    @property
    def num_nodes(self) -> int:
        return len(self.tokens) - 1

    def prefix(self, k: int) -> "DraftTree":
        """The first k nodes: a tree too, since every node's parent comes before it."""
        W = (k + 1 + 31) // 32
        return DraftTree(self.tokens[: k + 1], self.parents[: k + 1], self.depths[: k + 1],
                         self.mask[: k + 1, :W].contiguous())

    @staticmethod
    def chain(root: int, draft: list[int], device) -> "DraftTree":
        """A draft the tree builder did not make (kept for safety): verified as the chain it is."""
        n = len(draft)
        idx = torch.arange(n + 1, device=device)
        return DraftTree([root, *draft], (idx - 1).to(torch.int32), idx, chain_mask(n + 1, device))


class DDTreeProposer(DFlashProposer):
    def __init__(self, vllm_config, device, runner=None):
        super().__init__(vllm_config, device, runner)
        self._runner = runner  # the parent keeps it only where it needs it; the tree needs the batch's ids
        from . import TREE_ENV, COST_ENV

        self.mode = os.environ[TREE_ENV]
        self.budget = self.num_speculative_tokens  # N: the tree's nodes (the cap for caddtree)
        block = getattr(self.draft_model_config.hf_config, "block_size", None)
        # The drafter predicts D = block_size - 1 positions per round (what it was trained for).
        self.depth = min(self.budget, block - 1) if block else self.budget
        self.vocab_size = vllm_config.model_config.get_vocab_size()
        self.cost_model = None
        if self.mode == "caddtree":
            from ..cost import CostModel

            path = os.environ.get(COST_ENV)
            if path:
                self.cost_model = CostModel.load(path)
            else:
                self.cost_model = CostModel.default(vllm_config.model_config.hf_config, device,
                                                    vllm_config.model_config.dtype,
                                                    drafter_config=self.draft_model_config.hf_config)
        self.max_context = vllm_config.model_config.max_model_len
        self.trees: dict[str, DraftTree] = {}
        self._draft_logits = None

    def _sample_draft_tokens(self, hidden_states, sampling_metadata):
        # The marginals, kept for the tree; the argmax satisfies the parent's bookkeeping.
        logits = self.model.compute_logits(hidden_states)
        self._draft_logits = logits
        return logits.argmax(dim=-1), None

    def propose(self, num_speculative_tokens, **kwargs):
        if num_speculative_tokens == 0:
            return super().propose(num_speculative_tokens, **kwargs)
        next_token_ids = kwargs["next_token_ids"]
        super().propose(self.depth, **kwargs)
        self.num_speculative_tokens = self.budget
        B = next_token_ids.shape[0]
        logits = self._draft_logits.view(B, self.depth, -1)[..., : self.vocab_size]
        self._draft_logits = None
        N = min(self.budget, num_speculative_tokens)
        logprobs, token_ids = ops.topk_marginals(logits.float(), max(1, min(N, logits.shape[-1])))
        context = torch.as_tensor(self._runner.input_batch.num_computed_tokens_cpu[:B], dtype=torch.long)
        context = context.to(logprobs.device)
        cost, draft_cost = None, 0.0
        if self.cost_model is not None:
            cost = self.cost_model.table(context, N, self.max_context)
            draft_cost = float(self.cost_model.draft_cost)
        tree = ops.build_tree(logprobs, token_ids, next_token_ids.long(), context, N, cost, draft_cost)
        num_nodes = tree.num_nodes.tolist()
        tokens = tree.tokens.tolist()
        drafts, self.trees = [], {}  # only this round's trees: the next step verifies no others
        for b, req_id in enumerate(self._runner.input_batch.req_ids[:B]):
            n = num_nodes[b]
            self.trees[req_id] = DraftTree(tokens[b][: n + 1], tree.parents[b, : n + 1],
                                           tree.depths[b, : n + 1].long(),
                                           tree.tree_mask[b, : n + 1, : (n + 1 + 31) // 32].contiguous())
            drafts.append(tokens[b][1 : n + 1])
        return drafts
