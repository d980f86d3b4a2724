"""Tree verification inside vLLM's V1 model runner (``GPUModelRunner``, which the CPU runner inherits).

vLLM verifies a draft as a chain: the draft tokens follow the last sampled token at consecutive
positions under a causal mask, its rejection sampler walks the chain, and the accepted prefix is already
where the next step expects it. For a tree each step of the runner needs one change, made here by
wrapping four of its methods when the drafter is a :class:`~ddtree.vllm.proposer.DDTreeProposer`:

``_prepare_inputs``
    vLLM lays out the scheduled draft as root + k slots at consecutive KV slots (kept: slot j of the tree
    is written at position ``context + j``) but the rotary positions become ``context + depth(j)``; the
    step's :class:`~ddtree.vllm.tree_call.TreeCall` (masks, rows, contexts) is built here, by tensor ops.
``_build_attention_metadata``
    the tree call goes to the attention backend for the target's forward only.
``_sample``
    one target token per slot (argmax, or a sample from the request's processed distribution), then
    ``accept_tree`` walks the tree; the accepted path and the bonus token come out in vLLM's
    ``[B, 1 + max k]`` layout (-1 padded), so the scheduler's accounting (``context + accepted + 1``
    tokens computed) holds as for a chain. Then the accepted slots' KV moves to consecutive positions
    (every target layer), and the rows of the hidden states, input ids and positions move the same way,
    so the DFlash drafter reads the accepted path as the chain it expects.
``sample_tokens``
    hands ``_sample`` the hidden states of the step.

No host synchronisation on the step's path: index arithmetic is numpy on vLLM's host arrays, device
tensors are gathered and scattered with fixed shapes. (The proposer's one host read per step is the
drafted tokens the scheduler takes as lists.)

Sampling is distribution-exact because the tree does not depend on the target: each slot's target token
is an independent draw from the target's distribution there, and the walk follows the target's draws.
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from vllm.v1.outputs import SamplerOutput
from vllm.v1.sample.rejection_sampler import PLACEHOLDER_TOKEN_ID
from vllm.v1.worker import gpu_model_runner as gmr

from .. import ops
from . import check_config
from .attention import chain_mask, move_cache_rows
from .proposer import DDTreeProposer
from .tree_call import TreeCall, set_tree_call


_SAMPLING_EPS = 1e-5  # vLLM's: a temperature below this is greedy


class _Step:
    """What one step verifies, built by tensor ops in ``_prepare_inputs`` (host index arithmetic in numpy,
    device tensors gathered without a host synchronisation) for the ``B`` requests of the batch."""

    def __init__(self):
        self.call: TreeCall | None = None  # the target forward's tree attention call
        self.context: np.ndarray | None = None  # [B] tokens before this step's
        self.starts: np.ndarray | None = None  # [B] first query row
        self.q_lens: np.ndarray | None = None  # [B] query rows
        self.context_t = self.starts_t = None  # the same two on the device
        self.own_slots = None  # [B, T] bool on the device: the slots a request's query owns
        self.tokens = self.parents = None  # [B, T] the scheduled root + draft tokens, the trees' parents
        self.is_tree = None  # [B] bool: request verifies the tree its proposer drafted
        self.chain_positions = None  # [R] the call's rows' positions as a chain's (context + row)
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
        step.call = None
        drafts = scheduler_output.scheduled_spec_decode_tokens
        if not drafts or not self.drafter.tree_rows:
            return result  # no draft, or chains only (CaDDTree's choice): vLLM's own DFlash step verifies them
        self._ddtree_plan(step, drafts)
        return result

    return wrapped


def _plan(self, step: _Step, drafts: dict) -> None:
    """The step's trees (the proposer's, or a chain for a draft it did not make, e.g. after a
    preemption), their depth-based positions and the target forward's tree call."""
    B = self.input_batch.num_reqs
    req_ids = self.input_batch.req_ids[:B]
    tree = self.drafter.tree
    rows_of, proposed = self.drafter.tree_rows, self.drafter.tree_drafts
    scheduled = [drafts.get(r, ()) for r in req_ids]
    ks = np.fromiter(map(len, scheduled), dtype=np.int64, count=B)
    src = np.fromiter((rows_of.get(r, -1) for r in req_ids), dtype=np.int64, count=B)
    # A request verifies its proposer's tree when its draft is that tree's first k nodes (the scheduler may
    # cut a draft short); compared on the host, where both lists already are.
    is_tree = np.fromiter((k > 0 and s >= 0 and list(d) == proposed[r][:k]
                           for r, d, k, s in zip(req_ids, scheduled, ks, src)), dtype=bool, count=B)
    starts = self.query_start_loc.np[:B].astype(np.int64)
    q_lens = self.query_start_loc.np[1 : B + 1].astype(np.int64) - starts
    context = self.input_batch.num_computed_tokens_cpu[:B].astype(np.int64)
    T, W = int(ks.max()) + 1, (int(ks.max()) + 32) // 32
    col = np.arange(T)
    device = self.positions.device
    to = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)  # noqa: E731 host -> device
    dense = bool((q_lens == T).all())  # every request in the call with T rows: the step's first B * T rows
    if dense:
        own = None
        members, flat, num_nodes, own_t, chain_rows = _dense_indices(B, T, device)
    else:
        members = np.nonzero((q_lens > 0) & (q_lens <= T))[0]  # in the tree call; the rest: long prompt chunks
        own = col[None] < np.minimum(q_lens, T)[:, None]  # [B, T] the slots a request's query owns
        own_t = to(own)

    if tree is None or tree.tokens.shape[1] < T:  # no tree as wide as the step's drafts: chains only (a guard)
        is_tree[:] = False
    if is_tree.all() and (src == np.arange(B)).all():
        # Every request verifies its own tree, rows in the proposer's order (requests that finished since
        # were the last rows): the trees' tensors as they are.
        tokens, parents = tree.tokens[:B, :T].long(), tree.parents[:B, :T]
        depths, mask = tree.depths[:B, :T].long(), tree.tree_mask[:B, :T, :W]
    else:  # the scheduled tokens (root + draft, 0 past a request's query rows); chains where no tree
        own = np.ones((B, T), dtype=bool) if own is None else own
        tokens = self.input_ids.gpu[to(np.where(own, starts[:, None] + col[None], 0))].long()
        tokens = torch.where(own_t, tokens, torch.zeros_like(tokens))
        idx = torch.arange(T, device=device)
        chain_parents, chain_depths = (idx - 1).to(torch.int32).expand(B, T), idx.expand(B, T)
        chain = chain_mask(T, device).expand(B, T, W)
        if is_tree.any():
            safe, tree_t = to(np.maximum(src, 0)), to(is_tree)
            parents = torch.where(tree_t[:, None], tree.parents[safe, :T], chain_parents)
            depths = torch.where(tree_t[:, None], tree.depths[safe, :T].long(), chain_depths)
            mask = torch.where(tree_t[:, None, None], tree.tree_mask[safe, :T, :W], chain)
        else:
            parents, depths, mask = chain_parents, chain_depths, chain

    # Rotary positions: context + depth (a chain's depth is its row, so only trees change).
    if dense:  # no gathers: request b's slots are rows b * T ..
        ctx_m = to(context)
        self.positions[: B * T] = (ctx_m[:, None] + depths).reshape(-1)
        step.call = TreeCall(members=members, members_np=np.arange(B), slots=flat.view(B, T), gather=flat, rows=flat,
                             picks=flat, context_lens=ctx_m, tree_mask=mask.contiguous(), num_nodes=num_nodes,
                             max_len=int(context.max()) + T, others=False, dense=True)
        step.chain_positions = (ctx_m[:, None] + chain_rows).reshape(-1)  # context + row
    else:
        real = col[None] < q_lens[members, None]  # [M, T] the call's real slots
        flat_rows = starts[members, None] + col[None]
        picks = (np.arange(len(members))[:, None] * T + col[None])[real]  # the real slots in the call's [M * T]
        m, ctx_m = to(members), to(context[members])
        tree_positions = (ctx_m[:, None] + depths[m]).reshape(-1)[to(picks)]
        self.positions[to(flat_rows[real])] = tree_positions.to(self.positions.dtype)
        step.call = TreeCall(members=m, members_np=members, slots=to(np.where(real, flat_rows, -1)),
                             gather=to(np.where(real, flat_rows, 0).reshape(-1)), rows=to(flat_rows[real]),
                             picks=to(picks), context_lens=ctx_m, tree_mask=mask[m].contiguous(),
                             num_nodes=to((q_lens[members] - 1).astype(np.int32)),
                             max_len=int((context[members] + T).max()),
                             others=len(members) < int((q_lens > 0).sum()))
        step.chain_positions = to((context[members, None] + col[None])[real]).to(self.positions.dtype)
    step.context, step.starts, step.q_lens = context, starts, q_lens
    step.context_t, step.starts_t = ctx_m if dense else to(context), to(starts)
    step.own_slots = own_t
    step.tokens, step.parents, step.is_tree = tokens, parents, to(is_tree & (ks > 0))


@functools.lru_cache(maxsize=256)
def _dense_indices(B: int, T: int, device: torch.device):
    """A dense call's index tensors, made once per (B, T) and only read: the members 0..B-1, the flat query
    rows 0..B*T-1 (its gather, rows and picks alike), num_nodes (T - 1 each, i32), the [B, T] slots each
    request owns (all) and the rows 0..T-1 of a chain."""
    return (torch.arange(B, device=device), torch.arange(B * T, device=device),
            torch.full((B,), T - 1, dtype=torch.int32, device=device), torch.ones(B, T, dtype=torch.bool, device=device),
            torch.arange(T, device=device))


def _build_attention_metadata(orig):
    def wrapped(self, *args, **kwargs):
        if not _active(self) or _step(self).call is None:
            return orig(self, *args, **kwargs)
        set_tree_call(_step(self).call)
        try:
            return orig(self, *args, **kwargs)
        finally:
            set_tree_call(None)

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


def _target_tokens(sampler, logits: torch.Tensor, counts: list[int], metadata) -> torch.Tensor:
    """One token per logits row: argmax for greedy requests, else a draw from the request's processed
    distribution (temperature, top-k, top-p; the request's generator when it has a seed), made by vLLM's
    own random sampler as if every row were a request of its own. A seeded request's generator thus
    advances by exactly what vLLM's sampler takes for one token, once per slot in slot order, so its
    tokens do not depend on whether its prompt's first token was drawn here (a step that also verifies
    trees) or by vLLM alone (a step of prompts only): which of the two happens depends on when requests
    reach the engine. (vLLM's CPU sampler draws a seed per row from the generator, not V exponentials.)"""
    greedy = logits.argmax(dim=-1)
    if metadata.all_greedy:
        return greedy
    device = logits.device
    counts_t = torch.tensor(counts, device=device)
    rows = sum(counts)
    per_row = lambda x: None if x is None else x.repeat_interleave(counts_t, output_size=rows)  # noqa: E731
    req_greedy = metadata.temperature < _SAMPLING_EPS
    temperature = torch.where(req_greedy, torch.ones_like(metadata.temperature), metadata.temperature)
    starts = np.cumsum([0, *counts[:-1]]).tolist()
    row_generators = {row: gen for r, gen in sorted((metadata.generators or {}).items())
                      for row in range(starts[r], starts[r] + counts[r])}
    sampled, _ = sampler.topk_topp_sampler(logits.float() / per_row(temperature)[:, None], row_generators,
                                           per_row(metadata.top_k), per_row(metadata.top_p))
    return torch.where(per_row(req_greedy), greedy, sampled.view(-1))


def _sample(orig):
    def wrapped(self, logits, spec_decode_metadata):
        if not _active(self) or spec_decode_metadata is None or _step(self).call is None:
            return orig(self, logits, spec_decode_metadata)  # no tree planned (vLLM's dummy sampler run)
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
        ks = np.asarray(spec_decode_metadata.num_draft_tokens, dtype=np.int64)
        B, T = len(ks), int(ks.max()) + 1
        counts = (ks + 1).tolist()
        target = _target_tokens(self.sampler, logits, counts, metadata)

        # The batch's trees as [B, T]; a request without a draft is a root-only tree (num_nodes 0).
        col = np.arange(T)
        in_tree = col[None] <= ks[:, None]
        flat = (np.arange(B)[:, None] * T + col[None])[in_tree]  # where logits row j goes in [B, T]
        target_tokens = torch.zeros(B * T, dtype=torch.long, device=device)
        target_tokens[torch.from_numpy(flat).to(device)] = target
        num_nodes = torch.from_numpy(ks).to(device=device, dtype=torch.int32)
        tokens, parents = step.tokens[:, :T], step.parents[:, :T].contiguous()
        accepted, accept_len, next_token = ops.accept_tree(tokens, parents, num_nodes, target_tokens.view(B, T))

        # vLLM's layout: the accepted nodes' tokens, then the bonus token, -1 after.
        idx = torch.arange(T, device=device)
        path = tokens.gather(1, accepted.clamp(min=0))
        out = torch.cat([path[:, 1:], path[:, :1]], dim=1)
        last = (accept_len.long() - 1)[:, None]
        out = torch.where(idx[None] == last, next_token[:, None], out)
        out = torch.where(idx[None] <= last, out, torch.full_like(out, PLACEHOLDER_TOKEN_ID))
        self._ddtree_move_accepted(step, accepted, accept_len)
        return SamplerOutput(sampled_token_ids=out, logprobs_tensors=None)

    return wrapped


def _move_accepted(self, step: _Step, accepted: torch.Tensor, accept_len: torch.Tensor) -> None:
    """Put each tree's accepted path where a chain's would be: KV at positions context + 1..a, and the
    rows of the step's hidden states and input ids at query rows 1..a; positions back to a chain's.
    Every copy reads before any writes (a node's slot is never below its depth, the slot it moves to)."""
    on_cpu = accepted.device.type == "cpu"
    b, src, dst = _moves(step, accepted, accept_len, compact=on_cpu)
    if b is not None:
        B = step.context.shape[0]
        for group_id, caches in _target_caches(self):
            table = self.input_batch.block_table[group_id].get_device_tensor(B)
            if on_cpu:  # every layer's K and V in one call (rows already in place are skipped)
                torch.ops.ddtree.paged_compact_kv(_paged_views(self, group_id, caches), table.to(torch.int32),
                                                  step.context_t, accepted.long(), accept_len)
                continue
            block_size = self.kv_cache_config.kv_cache_groups[group_id].kv_cache_spec.block_size
            src_pos, dst_pos = step.context_t[b] + src, step.context_t[b] + dst
            src_blocks, dst_blocks = table[b, src_pos // block_size].long(), table[b, dst_pos // block_size].long()
            for kv in caches:
                move_cache_rows(kv, src_blocks, src_pos % block_size, dst_blocks, dst_pos % block_size)
        starts = step.starts_t[b]
        src_rows, dst_rows = starts + src, starts + dst
        tensors = [self.input_ids.gpu]
        if step.hidden is not None:
            hidden, aux = step.hidden
            tensors.append(hidden)
            tensors.extend(aux or [])
        for t in tensors:
            t[dst_rows.to(t.device)] = t[src_rows.to(t.device)]
    # Positions back to the chain's (context + row), rejected rows included: the DFlash drafter takes
    # its block's positions from the segment's last row.
    self.positions[step.call.rows] = step.chain_positions


def _paged_views(self, group_id: int, caches: list) -> list:
    """The group's CPU_ATTN caches as paged_compact_kv's K and V views, made once per set of caches (vLLM
    allocates them once; dozens of view ops a step otherwise)."""
    from .cpu_attention import paged_kv_views

    cached = self.__dict__.setdefault("_ddtree_paged_views", {})
    key = tuple(kv.data_ptr() for kv in caches)
    if group_id not in cached or cached[group_id][0] != key:
        cached[group_id] = (key, [view for kv in caches for view in paged_kv_views(kv)])
    return cached[group_id][1]


def _moves(step: _Step, accepted: torch.Tensor, accept_len: torch.Tensor, compact: bool):
    """(request, source slot, destination slot) ``[P]`` each of the slots to move, or Nones if none moves.

    A slot moves when it is on a tree's accepted path (depth j >= 1) at another slot than j. ``compact``
    (CPU tensors, where reading a count costs no synchronisation): only those are listed, and a path that
    is already in place (the drafter's first guesses, best-first, are slots 1, 2, ..) moves nothing. Else
    the list has a fixed size, ``B * T``, with every slot that does not move copied onto itself (slot 0,
    the request's own root, for padding), so no host synchronisation is needed on a device."""
    device = accepted.device
    B, T = accepted.shape
    idx = torch.arange(T, device=device)
    on_path = step.is_tree[:, None] & (idx[None] >= 1) & (idx[None] < accept_len[:, None])
    moving = on_path & (accepted.long() != idx[None])
    if compact:
        b, dst = moving.nonzero(as_tuple=True)
        if b.numel() == 0:
            return None, None, None
        return b, accepted[b, dst].long(), dst
    own = step.own_slots  # [B, T] the slots this request owns
    src = torch.where(moving, accepted.long(), torch.where(own, idx[None], 0))
    dst = torch.where(moving | own, idx[None], 0)
    return torch.arange(B, device=device).repeat_interleave(T), src.reshape(-1), dst.reshape(-1)


def _target_caches(self):
    """(kv cache group, [the per-layer caches of every target layer in it]); the drafter's layers are left
    alone: DFlash rewrites its context KV from the target's hidden states each round."""
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
            caches.append(kv)
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
    cls._ddtree_plan = _plan
    gmr.DFlashProposer = DDTreeProposer  # the runner builds its dflash drafter from this name
    _PATCHED = True
