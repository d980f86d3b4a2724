"""Tree attention for stock Hugging Face models, registered as ``attn_implementation="ddtree_tree"``.

A Qwen3/Llama-family model (any model whose attention goes through transformers' ``AttentionInterface``)
verifies a draft tree through :func:`ddtree.tree_attention` when its forward receives a
:class:`TreeAttentionState` as the keyword argument ``ddtree`` (transformers passes unknown forward
kwargs down to the attention function). The function writes the new keys/values into our static
per-layer KV cache at ``context_lens + slot`` and attends through the kernel; the mask is never dense.

Without a ``ddtree`` kwarg the function falls back to SDPA, so a model switched to ``ddtree_tree``
still runs ordinary forwards. No mask function is registered for the name, so transformers builds no
dense mask on our path (masking_utils exits early for attention functions it does not know); the
SDPA fallback therefore only suits unpadded inputs. :class:`ddtree.target.HFTarget` switches the
implementation only for the duration of its own forwards (:func:`use_tree_attention`).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch

from .layers import write_kv
from .ops import tree_attention

ATTN_NAME = "ddtree_tree"


@dataclass
class TreeAttentionState:
    """Per-forward state handed to every attention layer through the model's ``**kwargs``.

    k_cache, v_cache: one ``[B, Hkv, S, d]`` tensor per layer (indexed by ``module.layer_idx``).
    write_positions: ``[B, T]`` i64, the cache position of each new query slot's key/value.
    context_lens: ``[B]`` i64, committed positions every slot may attend to.
    tree_mask: ``[B, T, ceil(T/32)]`` i32 ancestor bits, or ``None`` for a causal prefill (then the
        context must be empty and the new keys are attended causally with SDPA).
    num_nodes: ``[B]`` i32, last valid tree slot per request (``T - 1`` for a full tree).
    """

    k_cache: list[torch.Tensor]
    v_cache: list[torch.Tensor]
    write_positions: torch.Tensor
    context_lens: torch.Tensor
    tree_mask: Optional[torch.Tensor]
    num_nodes: Optional[torch.Tensor]


def tree_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    scaling: Optional[float] = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The ``AttentionInterface`` entry: query ``[B, Hq, T, d]``, key/value ``[B, Hkv, T, d]`` (RoPE applied).

    Returns ``([B, T, Hq, d], None)`` as transformers expects.
    """
    state: Optional[TreeAttentionState] = kwargs.pop("ddtree", None)
    if state is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    scale = float(scaling if scaling is not None else query.shape[-1] ** -0.5)
    k_cache, v_cache = state.k_cache[module.layer_idx], state.v_cache[module.layer_idx]
    write_kv(k_cache, state.write_positions, key)
    write_kv(v_cache, state.write_positions, value)
    if state.tree_mask is None:
        # Causal prefill over an empty context: the prompt's own keys are all there is to attend to, so
        # plain causal SDPA is exact (right padding only adds keys after each valid row's last token).
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, is_causal=True, scale=scale, enable_gqa=query.shape[1] != key.shape[1]
        )
    else:
        out = tree_attention(query, k_cache, v_cache, state.context_lens, state.tree_mask, state.num_nodes, scale)
    return out.transpose(1, 2), None


def register() -> None:
    """Register ``ddtree_tree`` in transformers' ``AttentionInterface`` (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, tree_attention_forward)


@contextlib.contextmanager
def use_tree_attention(model: torch.nn.Module):
    """Within the block, ``model`` dispatches attention to ``ddtree_tree``; restored afterwards."""
    register()
    config = model.config
    previous = config._attn_implementation
    config._attn_implementation = ATTN_NAME
    try:
        yield
    finally:
        config._attn_implementation = previous
