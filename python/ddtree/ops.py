"""Typed wrappers over ``torch.ops.ddtree.*``, their fake (meta) implementations, and ``DraftTree``.

Every op takes its arguments positionally in the order of ``docs/DESIGN.md`` and runs on CPU and,
when the extension was built with CUDA, on CUDA. Shapes below use: ``B`` requests, ``D`` draft depth,
``V`` vocabulary, ``K`` candidates per depth, ``N`` max_nodes (tree arrays have ``N + 1`` slots, slot 0
is the root), ``W = ceil((N + 1) / 32)`` mask words, ``S`` cache positions, ``d`` head dim.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional, Sequence

import torch

from . import _C  # noqa: F401  (loads the library: registers torch.ops.ddtree.*)

_ops = torch.ops.ddtree


def _mask_words(slots: int) -> int:
    return (slots + 31) // 32


def pack_mask(dense: torch.Tensor) -> torch.Tensor:
    """The packed form of a tree mask: dense ``[..., T, S]`` bool -> ``[..., T, ceil(S / 32)]`` i32 whose
    word ``w`` holds columns ``32 w .. 32 w + 31``, column ``j`` in bit ``j % 32`` (the inverse of
    :meth:`DraftTree.dense_mask`)."""
    S = dense.shape[-1]
    W = _mask_words(S)
    padded = torch.zeros(*dense.shape[:-1], W * 32, dtype=torch.int64, device=dense.device)
    padded[..., :S] = dense.long()
    words = (padded.view(*dense.shape[:-1], W, 32) << torch.arange(32, device=dense.device)).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _check_same_device(op: str, ref_name: str, ref: torch.Tensor, **tensors) -> None:
    """validate.cpp's device check, for the fake impls: a call mixing CPU and meta tensors dispatches to
    the Meta kernel (these fakes), not to a C++ kernel, so the mismatch must be caught here."""
    for name, t in tensors.items():
        if t is not None:
            torch._check(t.device == ref.device, lambda: f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}")


# --------------------------------------------------------------------------------------------------
# topk_marginals


def topk_marginals(logits: torch.Tensor, k: int, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``k`` of ``log_softmax(logits / temperature)`` per (request, depth).

    logits: ``[B, D, V]`` fp32/fp16/bf16. Returns ``(logprobs [B, D, k] f32, token_ids [B, D, k] i64)``
    sorted by descending log-prob, ties by smaller token id. NaN logits count as ``-inf``; a row with
    ``+inf`` logits spreads its mass evenly over them.
    """
    return _ops.topk_marginals(logits, k, temperature)


@torch.library.register_fake("ddtree::topk_marginals")
def _topk_marginals_fake(logits, k, temperature=1.0):
    torch._check(logits.dim() == 3, lambda: "topk_marginals: logits must have 3 dimensions")
    B, D, _ = logits.shape
    return (logits.new_empty((B, D, k), dtype=torch.float32), logits.new_empty((B, D, k), dtype=torch.int64))


# --------------------------------------------------------------------------------------------------
# build_tree


@dataclass
class DraftTree:
    """The draft trees of a batch, padded to ``N + 1`` slots (slot 0 is the root).

    Nodes occupy slots ``1..num_nodes[b]`` in selection order, which is topological.
    """

    num_nodes: torch.Tensor  # [B] i32
    tokens: torch.Tensor  # [B, N+1] i64, slot 0 = root token, unused slots 0
    parents: torch.Tensor  # [B, N+1] i32, root and unused slots -1
    depths: torch.Tensor  # [B, N+1] i32, root 0
    positions: torch.Tensor  # [B, N+1] i64, context_len + depth
    scores: torch.Tensor  # [B, N+1] f32, path log-probability (root 0, unused -inf)
    tree_mask: torch.Tensor  # [B, N+1, W] i32, bit j of row i: slot j is i or an ancestor of i
    expected_tokens: torch.Tensor  # [B] f32, 1 + sum of the chosen nodes' path probabilities

    @property
    def num_slots(self) -> int:
        return self.tokens.shape[1]

    def to(self, device) -> "DraftTree":
        return DraftTree(*(getattr(self, f.name).to(device) for f in fields(self)))

    def trim(self, slots: int) -> "DraftTree":
        """The first ``slots`` slots: views, except the mask, copied contiguous and cut to ``ceil(slots / 32)`` words.

        CaDDTree pads its arrays to ``max_nodes + 1`` slots but usually fills far fewer, and verification
        costs what it is given, so callers trim to ``int(num_nodes.max()) + 1`` before verifying.
        """
        if not 1 <= slots <= self.num_slots:
            raise ValueError(f"DraftTree.trim: slots must be in [1, {self.num_slots}], got {slots}")
        W = (slots + 31) // 32
        return DraftTree(self.num_nodes, self.tokens[:, :slots], self.parents[:, :slots], self.depths[:, :slots],
                         self.positions[:, :slots], self.scores[:, :slots], self.tree_mask[:, :slots, :W].contiguous(),
                         self.expected_tokens)

    def dense_mask(self) -> torch.Tensor:
        """``[B, N+1, N+1]`` bool ancestor mask unpacked from ``tree_mask`` (for tests and reference paths)."""
        T = self.num_slots
        bits = torch.arange(32, device=self.tree_mask.device, dtype=torch.int32)
        unpacked = (self.tree_mask.unsqueeze(-1) >> bits) & 1  # [B, T, W, 32]
        return unpacked.flatten(-2)[..., :T].bool()


def build_tree(
    logprobs: torch.Tensor,
    token_ids: torch.Tensor,
    root_tokens: torch.Tensor,
    context_lens: torch.Tensor,
    max_nodes: int,
    verify_cost: Optional[torch.Tensor] = None,
    draft_cost: float = 0.0,
    budget_mode: str = "request",
) -> DraftTree:
    """Best-first draft tree over the factorised marginals.

    logprobs ``[B, D, K]`` f32 and token_ids ``[B, D, K]`` i64 (as from :func:`topk_marginals`),
    root_tokens ``[B]`` i64, context_lens ``[B]`` i64. Without ``verify_cost`` (DDTree) it takes
    ``min(max_nodes, #candidates)`` nodes. With ``verify_cost`` f32 it keeps the prefix of those nodes with
    the largest surrogate throughput (the first on ties; the cost need not be convex); ``budget_mode``
    says what the table prices:

    * ``"request"`` (CaDDTree), ``verify_cost [B, >= N+1]``: each request on its own, the first ``n``
      maximising ``theta(n) = (1 + sum_{k<=n} p_k) / (draft_cost + verify_cost[b, n])``.
    * ``"batch"`` (padded verify), ``verify_cost [1, >= N+1]``: the cost of verifying every request with
      ``n`` nodes; one ``n`` for the whole batch, maximising ``(B + sum_b S_b(n)) / (draft_cost + verify_cost[0, n])``.
    * ``"ragged"`` (varlen verify), ``verify_cost [1, >= B*N+1]``: the cost of ``B`` roots plus ``t``
      nodes in all; the batch's nodes in descending probability, the first ``t`` of them.

    The exact rules are in ``csrc/ops.h``.
    """
    return DraftTree(*_ops.build_tree(logprobs, token_ids, root_tokens, context_lens, max_nodes, verify_cost,
                                      draft_cost, budget_mode))


@torch.library.register_fake("ddtree::build_tree")
def _build_tree_fake(logprobs, token_ids, root_tokens, context_lens, max_nodes, verify_cost=None, draft_cost=0.0,
                     budget_mode="request"):
    _check_same_device("build_tree", "logprobs", logprobs, token_ids=token_ids, root_tokens=root_tokens,
                       context_lens=context_lens, verify_cost=verify_cost)
    B = logprobs.shape[0]
    T = max_nodes + 1
    e = logprobs.new_empty
    return (
        e((B,), dtype=torch.int32),
        e((B, T), dtype=torch.int64),
        e((B, T), dtype=torch.int32),
        e((B, T), dtype=torch.int32),
        e((B, T), dtype=torch.int64),
        e((B, T), dtype=torch.float32),
        e((B, T, _mask_words(T)), dtype=torch.int32),
        e((B,), dtype=torch.float32),
    )


# --------------------------------------------------------------------------------------------------
# tree_attention


def tree_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    context_lens: torch.Tensor,
    tree_mask: torch.Tensor,
    num_nodes: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Attention of the ``T`` tree slots over the committed context and their own ancestors.

    q ``[B, Hq, T, d]``; k_cache, v_cache ``[B, Hkv, S, d]`` (Hugging Face layout, ``Hq % Hkv == 0``)
    with the tree's keys/values already at positions ``context_len + slot``; context_lens ``[B]`` i64;
    tree_mask ``[B, T, ceil(T/32)]`` i32; num_nodes ``[B]`` i32. Returns ``[B, Hq, T, d]`` in q's dtype.
    Softmax in fp32; a row that sees no key returns zeros.
    """
    return _ops.tree_attention(q, k_cache, v_cache, context_lens, tree_mask, num_nodes, scale)


@torch.library.register_fake("ddtree::tree_attention")
def _tree_attention_fake(q, k_cache, v_cache, context_lens, tree_mask, num_nodes, scale):
    _check_same_device("tree_attention", "q", q, k_cache=k_cache, v_cache=v_cache, context_lens=context_lens,
                       tree_mask=tree_mask, num_nodes=num_nodes)
    return q.new_empty(q.shape)


# --------------------------------------------------------------------------------------------------
# accept_tree


def accept_tree(
    tokens: torch.Tensor,
    parents: torch.Tensor,
    num_nodes: torch.Tensor,
    target_tokens: torch.Tensor,
    max_depth: int = -1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Walk from the root along children whose token equals the target's token at their parent.

    tokens ``[B, N+1]`` i64, parents ``[B, N+1]`` i32, num_nodes ``[B]`` i32, target_tokens ``[B, N+1]``
    i64 (argmax or one sample per slot). Returns ``accepted_slots [B, max_depth+1]`` i64 (root first, -1
    padded; ``N + 1`` columns when ``max_depth < 0``), ``accept_len [B]`` i32 (root counted) and
    ``next_token [B]`` i64 (the bonus token: the target's token at the last accepted slot).
    """
    return _ops.accept_tree(tokens, parents, num_nodes, target_tokens, max_depth)


@torch.library.register_fake("ddtree::accept_tree")
def _accept_tree_fake(tokens, parents, num_nodes, target_tokens, max_depth=-1):
    _check_same_device("accept_tree", "tokens", tokens, parents=parents, num_nodes=num_nodes,
                       target_tokens=target_tokens)
    B, T = tokens.shape
    width = T if max_depth < 0 else min(max_depth + 1, T)
    return (
        tokens.new_empty((B, width), dtype=torch.int64),
        tokens.new_empty((B,), dtype=torch.int32),
        tokens.new_empty((B,), dtype=torch.int64),
    )


# --------------------------------------------------------------------------------------------------
# compact_kv


def compact_kv(
    caches: Sequence[torch.Tensor],
    context_lens: torch.Tensor,
    accepted_slots: torch.Tensor,
    accept_len: torch.Tensor,
) -> None:
    """In place, for every cache ``[B, H, S, d]`` (all layers' K and V in one launch): position
    ``context_len + i`` receives position ``context_len + accepted_slots[b, i]`` for ``i < accept_len[b]``,
    as if every read happened before any write.
    """
    _ops.compact_kv(list(caches), context_lens, accepted_slots, accept_len)


@torch.library.register_fake("ddtree::compact_kv")
def _compact_kv_fake(caches, context_lens, accepted_slots, accept_len):
    _check_same_device("compact_kv", "accepted_slots", accepted_slots, context_lens=context_lens,
                       accept_len=accept_len, **{f"caches[{i}]": c for i, c in enumerate(caches)})
    return None


# --------------------------------------------------------------------------------------------------
# paged KV cache: paged_tree_attention, paged_compact_kv
#
# Cache layout (vLLM's flash-attention layout): ``[num_blocks, block_size, H, d]``, head dim contiguous;
# position ``p`` of request ``b`` lives in block ``block_table[b, p // block_size]`` at offset
# ``p % block_size``; ``block_table`` is ``[B, max_blocks]`` i32.


def paged_tree_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    context_lens: torch.Tensor,
    tree_mask: torch.Tensor,
    num_nodes: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """:func:`tree_attention` over a paged KV cache.

    q ``[B, Hq, T, d]``; k_cache, v_cache ``[num_blocks, block_size, Hkv, d]`` (``Hq % Hkv == 0``) with the
    tree's keys/values already at positions ``context_len + slot``; block_table ``[B, max_blocks]`` i32
    (``context_len + T <= max_blocks * block_size``; the blocks of positions ``[0, context_len +
    num_nodes]`` must exist); context_lens ``[B]`` i64; tree_mask ``[B, T, ceil(T/32)]`` i32; num_nodes
    ``[B]`` i32. Returns ``[B, Hq, T, d]`` in q's dtype (and, on CPU, q's memory layout), as
    :func:`tree_attention` would on the dense cache. On CPU the caches are read in place through any strides
    (vLLM's CPU backend keeps keys transposed per block: pass them as a permuted view).
    """
    return _ops.paged_tree_attention(q, k_cache, v_cache, block_table, context_lens, tree_mask, num_nodes, scale)


@torch.library.register_fake("ddtree::paged_tree_attention")
def _paged_tree_attention_fake(q, k_cache, v_cache, block_table, context_lens, tree_mask, num_nodes, scale):
    _check_same_device("paged_tree_attention", "q", q, k_cache=k_cache, v_cache=v_cache, block_table=block_table,
                       context_lens=context_lens, tree_mask=tree_mask, num_nodes=num_nodes)
    return q.new_empty(q.shape)


def paged_compact_kv(
    caches: Sequence[torch.Tensor],
    block_table: torch.Tensor,
    context_lens: torch.Tensor,
    accepted_slots: torch.Tensor,
    accept_len: torch.Tensor,
) -> None:
    """:func:`compact_kv` over paged caches ``[num_blocks, block_size, H, d]`` (one block size, one
    ``block_table [B, max_blocks]`` i32 for all), in place, every layer in one call: position
    ``context_len + i`` receives position ``context_len + accepted_slots[b, i]`` for ``i < accept_len[b]``,
    as if every read of a request happened before any of its writes. The rows different requests touch
    must be distinct.
    """
    _ops.paged_compact_kv(list(caches), block_table, context_lens, accepted_slots, accept_len)


@torch.library.register_fake("ddtree::paged_compact_kv")
def _paged_compact_kv_fake(caches, block_table, context_lens, accepted_slots, accept_len):
    _check_same_device("paged_compact_kv", "accepted_slots", accepted_slots, block_table=block_table,
                       context_lens=context_lens, accept_len=accept_len,
                       **{f"caches[{i}]": c for i, c in enumerate(caches)})
    return None
