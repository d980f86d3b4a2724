"""Tree verification inside vLLM's V1 model runner (``GPUModelRunner``, which the CPU runner inherits).

vLLM verifies a draft as a chain: the draft tokens follow the last sampled token at consecutive
positions under a causal mask, its rejection sampler walks the chain, and the accepted prefix is already
where the next step expects it. For a tree each step of the runner needs one change, made here by
wrapping four of its methods when the drafter is a :class:`~ddtree.vllm.proposer.DDTreeProposer`:

``_prepare_inputs``
    vLLM lays out the scheduled draft as root + k slots at consecutive KV slots (kept: slot j of the tree
    is written at position ``context + j``) but the rotary positions become ``context + depth(j)``.
``_build_attention_metadata``
    the trees' ancestor masks go to the attention backend (:mod:`ddtree.vllm.attention`) for the target's
    forward only.
``_sample``
    one target token per slot (argmax, or a sample from the request's processed distribution), then
    ``accept_tree`` walks the tree; the accepted path and the bonus token come out in vLLM's
    ``[B, 1 + max k]`` layout (-1 padded), so the scheduler's accounting (``context + accepted + 1``
    tokens computed) holds as for a chain. Then the accepted slots' KV moves to consecutive positions
    (``paged_compact_kv``, every target layer), and the rows of the hidden states, input ids and
    positions move the same way, so the DFlash drafter reads the accepted path as the chain it expects.
``sample_tokens``
    hands ``_sample`` the hidden states of the step.

Sampling is distribution-exact because the tree does not depend on the target: each slot's target token
is an independent draw from the target's distribution there, and the walk follows the target's draws.
"""
from __future__ import annotations

import numpy as np
import torch

from vllm.v1.outputs import SamplerOutput
from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p
from vllm.v1.sample.rejection_sampler import PLACEHOLDER_TOKEN_ID
from vllm.v1.worker import gpu_model_runner as gmr

from .. import ops
from . import check_config
from .attention import kv_views, set_verify_masks
from .proposer import DDTreeProposer, DraftTree

_SAMPLING_EPS = 1e-5  # vLLM's: a temperature below this is greedy


class _Step:
    """What one step verifies: the tree of each request index that has a draft, and its context."""

    def __init__(self):
        self.trees: dict[int, DraftTree] = {}
        self.context: np.ndarray | None = None
        self.hidden = None  # (hidden_states, aux_hidden_states) during sample_tokens


def _active(runner) -> bool:
    return isinstance(getattr(runner, "drafter", None), DDTreeProposer)


def _step(runner) -> _Step:
    if not hasattr(runner, "_ddtree_step"):
        runner._ddtree_step = _Step()
    return runner._ddtree_step


def _init(orig):
    def wrapped(self, vllm_config, *args, **kwargs):
        check_config(vllm_config)
        orig(self, vllm_config, *args, **kwargs)

    return wrapped


def _prepare_inputs(orig):
    def wrapped(self, scheduler_output, num_scheduled_tokens):
        result = orig(self, scheduler_output, num_scheduled_tokens)
        if not _active(self):
            return result
        step = _step(self)
        step.trees = {}
        num_reqs = self.input_batch.num_reqs
        step.context = self.input_batch.num_computed_tokens_cpu[:num_reqs].copy()
        starts = self.query_start_loc.np
        for req_id, draft in scheduler_output.scheduled_spec_decode_tokens.items():
            r = self.input_batch.req_id_to_index[req_id]
            k = len(draft)
            tree = self.drafter.trees.get(req_id)
            if tree is not None and k <= tree.num_nodes and tree.tokens[1 : k + 1] == list(draft):
                tree = tree.prefix(k)
            else:  # not the tree we drafted (e.g. after a preemption): verify it as a chain
                root = int(self.input_ids.gpu[starts[r]])
                tree = DraftTree.chain(root, list(draft), self.positions.device)
            step.trees[r] = tree
            s = int(starts[r])
            self.positions[s : s + k + 1] = int(step.context[r]) + tree.depths.to(self.positions.device)
        return result

    return wrapped


def _build_attention_metadata(orig):
    def wrapped(self, *args, **kwargs):
        if not _active(self) or not _step(self).trees:
            return orig(self, *args, **kwargs)
        set_verify_masks({r: t.mask for r, t in _step(self).trees.items()})
        try:
            return orig(self, *args, **kwargs)
        finally:
            set_verify_masks(None)

    return wrapped


def _sample_tokens(orig):
    def wrapped(self, grammar_output):
        if not _active(self):
            return orig(self, grammar_output)
        if grammar_output is not None:
            raise NotImplementedError("ddtree.vllm: structured output (grammars) is not supported with "
                                      "tree verification")
        state = self.execute_model_state  # vLLM's ExecuteModelState (a NamedTuple) or None
        step = _step(self)
        step.hidden = (state.hidden_states, state.aux_hidden_states) if state is not None else None
        try:
            return orig(self, grammar_output)
        finally:
            step.hidden = None

    return wrapped


def _target_tokens(logits: torch.Tensor, counts: list[int], metadata) -> torch.Tensor:
    """One token per logits row: argmax for greedy requests, else a draw from the request's processed
    distribution (temperature, top-k, top-p; the request's generator when it has a seed)."""
    greedy = logits.argmax(dim=-1)
    if metadata.all_greedy:
        return greedy
    device = logits.device
    counts_t = torch.tensor(counts, device=device)
    per_row = lambda x: None if x is None else x.repeat_interleave(counts_t)  # noqa: E731 request -> its rows
    req_greedy = metadata.temperature < _SAMPLING_EPS
    temperature = torch.where(req_greedy, torch.ones_like(metadata.temperature), metadata.temperature)
    processed = apply_top_k_top_p(logits.float() / per_row(temperature)[:, None], per_row(metadata.top_k),
                                  per_row(metadata.top_p))
    probs = processed.softmax(dim=-1)
    noise = torch.empty_like(probs).exponential_()
    starts = [0, *counts_t.cumsum(0).tolist()[:-1]]
    for r, gen in (metadata.generators or {}).items():
        noise[starts[r] : starts[r] + counts[r]].exponential_(generator=gen)
    sampled = probs.div(noise).argmax(dim=-1)  # the exponential race: one exact draw per row
    return torch.where(req_greedy.repeat_interleave(counts_t), greedy, sampled)


def _sample(orig):
    def wrapped(self, logits, spec_decode_metadata):
        if not _active(self) or spec_decode_metadata is None:
            return orig(self, logits, spec_decode_metadata)
        metadata = self.input_batch.sampling_metadata
        unsupported = [name for name, used in (
            ("logprobs", metadata.max_num_logprobs is not None),
            ("penalties", not metadata.no_penalties),
            ("allowed_token_ids", metadata.allowed_token_ids_mask is not None),
            ("bad_words", bool(metadata.bad_words_token_ids))) if used]
        if unsupported:
            raise NotImplementedError(f"ddtree.vllm: {', '.join(unsupported)} not supported with tree "
                                      "verification (unset DDTREE_VLLM_TREE for such requests)")
        step = _step(self)
        device = logits.device
        ks = list(spec_decode_metadata.num_draft_tokens)
        B, K = len(ks), max(ks)
        counts = [k + 1 for k in ks]
        target = _target_tokens(logits, counts, metadata)

        # The batch's trees, padded to K + 1 slots; a request without a draft is a root-only tree.
        tokens = torch.zeros(B, K + 1, dtype=torch.long, device=device)
        parents = torch.full((B, K + 1), -1, dtype=torch.int32, device=device)
        target_tokens = torch.zeros(B, K + 1, dtype=torch.long, device=device)
        rows = torch.full((B, K + 1), -1, dtype=torch.long)
        start = 0
        for r, k in enumerate(ks):
            tree = step.trees.get(r)
            if tree is not None:
                tokens[r, : k + 1] = torch.tensor(tree.tokens, device=device)
                parents[r, : k + 1] = tree.parents.to(device)
            rows[r, : k + 1] = torch.arange(start, start + k + 1)
            target_tokens[r, : k + 1] = target[start : start + k + 1]
            start += k + 1
        num_nodes = torch.tensor(ks, dtype=torch.int32, device=device)
        accepted, accept_len, next_token = ops.accept_tree(tokens, parents, num_nodes, target_tokens)

        # vLLM's layout: the accepted nodes' tokens, then the bonus token, -1 after.
        col = torch.arange(K + 1, device=device)
        path = tokens.gather(1, accepted.clamp(min=0))
        out = torch.cat([path[:, 1:], path[:, :1]], dim=1)
        last = (accept_len.long() - 1)[:, None]
        out = torch.where(col[None] == last, next_token[:, None], out)
        out = torch.where(col[None] <= last, out, torch.full_like(out, PLACEHOLDER_TOKEN_ID))
        self._ddtree_move_accepted(step, ks, accepted, accept_len)
        return SamplerOutput(sampled_token_ids=out, logprobs_tensors=None)

    return wrapped


def _move_accepted(self, step: _Step, ks: list[int], accepted: torch.Tensor, accept_len: torch.Tensor) -> None:
    """Put each request's accepted path where a chain's would be: KV at positions context + 1..a, and
    the rows of the step's hidden states and input ids at query rows 1..a; positions back to a chain's."""
    device = accepted.device
    num_reqs = len(ks)
    has_tree = torch.tensor([k > 0 and r in step.trees for r, k in enumerate(ks)], device=device)
    if not bool(has_tree.any()):
        return
    move_len = torch.where(has_tree, accept_len, torch.zeros_like(accept_len))
    context = torch.as_tensor(step.context[:num_reqs], dtype=torch.long, device=device)
    starts = torch.as_tensor(self.query_start_loc.np[:num_reqs], dtype=torch.long, device=device)
    col = torch.arange(accepted.shape[1], device=device)
    if bool((move_len > 1).any()):
        for group_id, caches in _target_caches(self):
            table = self.input_batch.block_table[group_id].get_device_tensor(num_reqs).to(torch.int32)
            ops.paged_compact_kv(caches, table, context, accepted, move_len.to(torch.int32))
        moving = (col[None] >= 1) & (col[None] < move_len[:, None])
        src = (starts[:, None] + accepted.clamp(min=0))[moving]
        dst = (starts[:, None] + col[None])[moving]
        tensors = [self.input_ids.gpu]
        if step.hidden is not None:
            hidden, aux = step.hidden
            tensors.append(hidden)
            tensors.extend(aux or [])
        for t in tensors:
            t[dst.to(t.device)] = t[src.to(t.device)]
    # Positions back to the chain's (context + row), rejected rows included: the DFlash drafter takes
    # its block's positions from the segment's last row.
    rows = has_tree[:, None] & (col[None] <= torch.tensor(ks, device=device)[:, None])
    self.positions[(starts[:, None] + col[None])[rows].to(self.positions.device)] = (
        (context[:, None] + col[None])[rows].to(self.positions.device))


def _target_caches(self):
    """(kv cache group, [K, V views of every target layer in it]); the drafter's layers are left alone:
    DFlash rewrites its context KV from the target's hidden states each round."""
    drafter_layers = set(getattr(self.drafter, "_draft_attn_layer_names", ()) or ())
    context = self.compilation_config.static_forward_context
    for group_id, group in enumerate(self.kv_cache_config.kv_cache_groups):
        seen, caches = set(), []
        for name in group.layer_names:
            if name in drafter_layers or name not in context:
                continue
            kv = context[name].kv_cache
            if not isinstance(kv, torch.Tensor) or kv.data_ptr() in seen:
                continue
            seen.add(kv.data_ptr())
            caches.extend(kv_views(kv, group.kv_cache_spec.head_size))
        if caches:
            yield group_id, caches


_PATCHED = False


def patch() -> None:
    """Wrap the runner's methods (once per process); each wrapper defers to vLLM's own code unless the
    runner's drafter is a DDTreeProposer."""
    global _PATCHED
    if _PATCHED:
        return
    cls = gmr.GPUModelRunner
    cls.__init__ = _init(cls.__init__)
    cls._prepare_inputs = _prepare_inputs(cls._prepare_inputs)
    cls._build_attention_metadata = _build_attention_metadata(cls._build_attention_metadata)
    cls.sample_tokens = _sample_tokens(cls.sample_tokens)
    cls._sample = _sample(cls._sample)
    cls._ddtree_move_accepted = _move_accepted
    gmr.DFlashProposer = DDTreeProposer  # the runner builds its dflash drafter from this name
    _PATCHED = True
