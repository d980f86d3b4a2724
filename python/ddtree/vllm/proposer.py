"""The DDTree / CaDDTree proposer: vLLM's DFlash drafter, whose per-position marginals become a tree.

vLLM's DFlash proposer runs the drafter once per round over the bonus token and ``D`` mask tokens and
takes the argmax at each mask position (a chain). This subclass keeps that forward (same inputs, same
drafter KV handling) but keeps the ``[B, D, V]`` logits and builds a tree of up to ``N`` nodes
(``num_speculative_tokens``) from them with ``topk_marginals`` + ``build_tree``: a fixed budget of ``N``
("ddtree") or the cost-aware budget capped at ``N`` ("caddtree"). The tree's node tokens go to the
scheduler as the request's draft (a list, so each request may draft a different number); the batch's
tree tensors stay with the proposer, and the runner verifies them (see :mod:`ddtree.vllm.runner`).
"""
from __future__ import annotations

import os

import torch

from vllm.logger import init_logger
from vllm.v1.spec_decode.dflash import DFlashProposer

from .. import ops
from ..chain_choice import AcceptanceScale, chain_expected_per_request, chain_or_tree

logger = init_logger("vllm.plugins.ddtree")  # under vLLM's logger: its handler and format

# Once the chain wins a priced round, this many rounds (that one included) draft the chain of the chosen
# length before the tree is built and priced again: pricing costs a step the top-k marginals, the tree
# build and the choice (0.3-1 ms on the shipped pair, 5-10% of a chain step there), and in an engine where
# chains win they keep winning for many rounds (the batch and the costs change slowly). A tree round is
# priced every round.
CHAIN_ROUNDS = 4


def _cost_model(vllm_config, device, drafter_config):
    """CaDDTree's cost model and where it came from: DDTREE_VLLM_COST_MODEL, else this engine's cached
    measurement (``ddtree profile --vllm``), else the roofline estimate."""
    from ..cost import CostModel
    from . import COST_ENV
    from .profile import cache_path, key_of

    path = os.environ.get(COST_ENV)
    if path:
        return CostModel.load(path), f"the cost model {path} ({COST_ENV})"
    key = key_of(vllm_config, device)
    cached = cache_path(key)
    if cached.is_file():
        model = CostModel.load(cached)
        if model.meta.get("key") == key:
            return model, f"this engine's measured costs ({cached}, from `ddtree profile --vllm`)"
    model = CostModel.default(vllm_config.model_config.hf_config, device, vllm_config.model_config.dtype,
                              drafter_config=drafter_config)
    return model, (f"the built-in roofline estimate: a fallback, not a measurement (measure this engine with "
                   f"`ddtree profile --vllm --target {vllm_config.model_config.model} --drafter "
                   f"{vllm_config.speculative_config.draft_model_config.model} --dtype {key['dtype']}`, cached "
                   f"as {cached}, or give {COST_ENV})")


class DDTreeProposer(DFlashProposer):
    def __init__(self, vllm_config, device, runner=None):
        super().__init__(vllm_config, device, runner)
        self._runner = runner  # the parent keeps it only where it needs it; the tree needs the batch's ids
        from . import TREE_ENV, budget_mode

        self.mode = os.environ[TREE_ENV]
        self.budget_mode = budget_mode() if self.mode == "caddtree" else "request"
        self.budget = self.num_speculative_tokens  # N: the tree's nodes (the cap for caddtree)
        block = getattr(self.draft_model_config.hf_config, "block_size", None)
        # The drafter predicts D = block_size - 1 positions per round (what it was trained for).
        self.depth = min(self.budget, block - 1) if block else self.budget
        self.vocab_size = vllm_config.model_config.get_vocab_size()
        self.cost_model = None  # caddtree: chosen at the first round, once the worker's threads are set
        self.force_chain = False  # draft the top-1 chain of min(budget, depth) tokens (`ddtree profile --vllm`)
        self.tree = None  # this round's ops.build_tree result ([B, N + 1] tensors); the next step verifies it
        self.tree_rows: dict[str, int] = {}  # request id -> its row of self.tree (empty: the step drafted chains)
        self.tree_drafts: dict[str, list[int]] = {}  # request id -> the tree's node tokens it returned as the draft
        self.rounds = {"tree": 0, "chain": 0, "priced": 0}  # drafting rounds of each kind; rounds priced
        self._unpriced_chains, self._chain_len = 0, 0  # rounds left to draft the last chosen chain unpriced
        self.acceptance = AcceptanceScale(self.depth + 1)  # measured / predicted draft tokens, tree and chain
        self._vllm_config, self._device = vllm_config, device
        self.max_context = vllm_config.model_config.max_model_len
        if self.mode == "ddtree":
            logger.info("ddtree.vllm: DFlash drafts become ddtree trees of depth %d: a fixed budget of %d nodes",
                        self.depth, self.budget)

    def _load_cost_model(self) -> None:
        self.cost_model, source = _cost_model(self._vllm_config, self._device, self.draft_model_config.hf_config)
        logger.info("ddtree.vllm: DFlash drafts become caddtree trees of depth %d: the cost-aware budget (at most %d "
                    "nodes, %s mode), priced by %s", self.depth, self.budget, self.budget_mode, source)
        if self.cost_model.chain is not None and self.budget_mode == "batch":
            logger.info("ddtree.vllm: chains priced apart: a step drafts the top-1 chain instead of the tree "
                        "when the chain's measured cost makes it faster")
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
        chain = super().propose(self.depth, **kwargs)  # [B, depth]: the argmax chain, as vLLM's DFlash drafts
        self.num_speculative_tokens = self.budget
        B = next_token_ids.shape[0]
        if self._unpriced_chains > 0:  # the chain won the last priced round: draft it as vLLM's DFlash would
            self._unpriced_chains -= 1
            self.acceptance.round(self._runner.input_batch.req_ids[:B],
                                  self._runner.input_batch.num_computed_tokens_cpu[:B])
            self._draft_logits = None
            self.tree, self.tree_rows, self.tree_drafts = None, {}, {}
            self.rounds["chain"] += 1
            return chain[:, : self._chain_len].tolist()
        logits = self._draft_logits.view(B, self.depth, -1)[..., : self.vocab_size]
        self._draft_logits = None
        N = min(self.budget, num_speculative_tokens)
        logprobs, token_ids = ops.topk_marginals(logits.float(), max(1, min(N, logits.shape[-1])))
        context = torch.as_tensor(self._runner.input_batch.num_computed_tokens_cpu[:B], dtype=torch.long)
        context = context.to(logprobs.device)
        cost, draft_cost = None, 0.0
        if self.mode == "caddtree" and self.cost_model is None:
            self._load_cost_model()
        if self.cost_model is not None:
            # request: each request's own table; batch / ragged: the step's B requests priced together
            # (one node count for all, or the batch's best t nodes against B roots + t slots).
            cost = self.cost_model.table(context, N, self.max_context, mode=self.budget_mode)
            draft_cost = float(self.cost_model.draft_cost if self.budget_mode == "request"
                               else self.cost_model.draft_cost_at(B))
        tree = ops.build_tree(logprobs, token_ids, next_token_ids.long(), context, N, cost, draft_cost,
                              self.budget_mode)
        self.rounds["priced"] += 1
        # The step's one host read: each request's tree (node count, tokens) and, where chains are priced
        # apart, the drafter's top-1 tokens and the step's choice (chain or tree, the chain's length).
        parts = [tree.num_nodes[:, None].to(tree.tokens.dtype), tree.tokens[:, 1:]]
        choice = self._chain_choice(logprobs, context, tree, cost, draft_cost, N)
        if choice is not None:  # + the top-1 tokens, the choice, and each kind's expected tokens in micro-tokens
            use_chain, k = choice
            expected = torch.stack([tree.expected_tokens, chain_expected_per_request(logprobs[:, :, 0], k)], 1)
            parts += [token_ids[:, :, 0], (expected.double() * 1e6).round().to(k.dtype),
                      torch.stack([use_chain.to(k.dtype), k]).expand(B, 2)]
        rows = torch.cat(parts, dim=1).tolist()
        req_ids = self._runner.input_batch.req_ids[:B]
        if choice is not None:
            chain = bool(rows[0][-2])
            self.acceptance.round(req_ids, self._runner.input_batch.num_computed_tokens_cpu[:B],
                                  "chain" if chain else "tree", [row[-3 if chain else -4] * 1e-6 for row in rows])
        if choice is not None and chain:  # chains: vLLM verifies them as its own DFlash drafts
            self.tree, self.tree_rows, self.tree_drafts = None, {}, {}
            self.rounds["chain"] += 1
            k, first = rows[0][-1], N + 1
            if not self.force_chain:  # the next rounds draft this chain without pricing (see CHAIN_ROUNDS)
                self._unpriced_chains, self._chain_len = CHAIN_ROUNDS - 1, k
            return [row[first : first + k] for row in rows]
        drafts = [row[1 : row[0] + 1] for row in rows]
        self.tree, self.tree_rows = tree, {req_id: b for b, req_id in enumerate(req_ids)}
        self.tree_drafts = dict(zip(req_ids, drafts))
        self.rounds["tree"] += 1
        return drafts

    def _chain_choice(self, logprobs, context, tree, cost, draft_cost: float, N: int):
        """(use_chain 0-d bool, chain length 0-d int) on the device, or None where chains are not priced
        apart: the profile's fixed chain, else CaDDTree's batch mode with measured chain costs."""
        depth = min(N, logprobs.shape[1])
        if self.force_chain:
            return (torch.ones((), dtype=torch.bool, device=logprobs.device),
                    torch.tensor(depth, device=logprobs.device))
        model = self.cost_model
        if model is None or model.chain is None or self.budget_mode != "batch" or depth < 1:
            return None
        chain_cost = model.chain.table(context, depth, self.max_context, mode="batch")[0]
        tree_cost = cost[0].gather(0, tree.num_nodes.max().long().reshape(1))
        # Each kind's expected draft tokens as measured in this engine so far (1 until measured).
        return chain_or_tree(logprobs[:, :depth, 0], tree.expected_tokens, tree_cost, chain_cost, draft_cost,
                             self.acceptance.scale("tree"), self.acceptance.scale("chain"))
