"""vLLM's CPU attention backend (CPU_ATTN), with tree verification added.

Every attention call vLLM makes runs through vLLM's own CPU kernels exactly as without the plugin
(prompts, plain decodes, the DFlash drafter's block, the KV writes), except the target forward of a step
that verifies draft trees: the runner hands this backend's metadata builder one
:class:`~ddtree.vllm.tree_call.TreeCall` for that forward only, and the requests in it attend under their
trees' ancestor masks. Requests of that step that are not in
the call (a long prompt chunk scheduled beside the trees) keep vLLM's kernel: it runs over the whole batch
first and the tree rows are overwritten.

CPU_ATTN's cache, per layer ``[num_blocks, Hkv, block_size, 2 * d]``, holds per (block, head) the keys
transposed, ``[d, block_size]``, then the values ``[block_size, d]`` (the layout its "vec" kernels write).
A verification copies the blocks its requests read out of the cache once per layer
(:func:`gather_blocks`: the keys stay transposed, as the first matrix product wants them) and attends with
two batched matrix products under a visibility bias built once per step (:func:`visibility_bias`). At the
sizes of a verification step (a few slots per request over a short context) this measured 1.7-5.7x faster
than ``ddtree.tree_attention`` over the same gathered blocks and within 1.0-3.6x of vLLM's own kernel on a
causal chain (bench/RESULTS.md).
"""
from __future__ import annotations

import torch

from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadataBuilder,
)

from .tree_call import TreeCall, tree_call


def cpu_kv_views(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CPU_ATTN's per-layer cache as (keys ``[num_blocks, Hkv, d, block_size]``, values
    ``[num_blocks, Hkv, block_size, d]``), both views."""
    nb, h, bs, two_d = kv_cache.shape
    halves = kv_cache.view(nb, h, 2, bs * (two_d // 2))
    return halves[:, :, 0].view(nb, h, two_d // 2, bs), halves[:, :, 1].view(nb, h, bs, two_d // 2)


def gather_blocks(kv_cache: torch.Tensor, block_table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys, transposed, ``[B, Hkv, d, S]`` and the values ``[B, Hkv, S, d]`` of the table's blocks
    (``S = blocks * block_size``; position p of request b at index p), copied out of the paged cache."""
    nb, h, bs, two_d = kv_cache.shape
    d = two_d // 2
    B, n = block_table.shape
    picked = kv_cache.view(nb, h, 2, bs * d).index_select(0, block_table.reshape(-1)).view(B, n, h, 2, bs * d)
    keys_t = picked[:, :, :, 0].view(B, n, h, d, bs).permute(0, 2, 3, 1, 4).reshape(B, h, d, n * bs)
    values = picked[:, :, :, 1].view(B, n, h, bs, d).permute(0, 2, 1, 3, 4).reshape(B, h, n * bs, d)
    return keys_t, values


def visibility_bias(call: TreeCall, span: int, dtype: torch.dtype) -> torch.Tensor:
    """``[M, T, span]`` additive bias, 0 where slot i of request m sees position p, -inf elsewhere: the
    context ``p < context_len`` and the slots of its ancestors ``p = context_len + j`` (the tree mask's
    bits, self included). A padding row sees position 0 only (its output is discarded; no empty softmax)."""
    M, T, _ = call.tree_mask.shape
    device = call.tree_mask.device
    slot = torch.arange(T, device=device)
    bits = (call.tree_mask[:, :, slot // 32] >> (slot % 32)) & 1  # [M, T, T] row i, slot j
    bits = bits.bool() & (slot[None, None, :] <= call.num_nodes[:, None, None])
    ctx = call.context_lens[:, None, None]
    visible = torch.arange(span, device=device)[None, None, :] < ctx
    visible = visible.expand(M, T, span).clone()
    visible.scatter_(2, (ctx + slot[None, None, :]).expand(M, T, T), bits)
    padding = slot[None, :] > call.num_nodes[:, None]
    visible[:, :, 0] |= padding
    return torch.zeros(M, T, span, dtype=dtype, device=device).masked_fill_(~visible, float("-inf"))


def tree_attention_torch(q: torch.Tensor, keys_t: torch.Tensor, values: torch.Tensor, bias: torch.Tensor,
                         scale: float) -> torch.Tensor:
    """Attention of q ``[M, Hq, T, d]`` over keys_t ``[M, Hkv, d, S]`` / values ``[M, Hkv, S, d]`` under the
    additive bias ``[M, T, S]``: two batched matrix products, the G = Hq / Hkv query heads of a kv head
    stacked as its rows (GQA without copying keys or values); softmax in fp32."""
    M, Hq, T, d = q.shape
    h = keys_t.shape[1]
    scores = torch.matmul(q.reshape(M, h, (Hq // h) * T, d), keys_t).float()
    scores = scores.mul_(scale).view(M, h, Hq // h, T, -1).add_(bias[:, None, None])
    probs = scores.softmax(dim=-1).to(values.dtype).view(M, h, (Hq // h) * T, -1)
    return torch.matmul(probs, values).view(M, Hq, T, d)


def move_cache_rows(kv_cache: torch.Tensor, src_blocks, src_offsets, dst_blocks, dst_offsets) -> None:
    """Move the key and value rows (block, offset) -> (block, offset) of one layer's CPU_ATTN cache, every
    read before any write (the right-hand sides are gathered first)."""
    keys, values = cpu_kv_views(kv_cache)
    keys[dst_blocks, :, :, dst_offsets] = keys[src_blocks, :, :, src_offsets]
    values[dst_blocks, :, dst_offsets] = values[src_blocks, :, src_offsets]


class DDTreeCPUBackend(CPUAttentionBackend):
    @staticmethod
    def get_impl_cls() -> type["DDTreeCPUImpl"]:
        return DDTreeCPUImpl

    @staticmethod
    def get_builder_cls() -> type["DDTreeCPUMetadataBuilder"]:
        return DDTreeCPUMetadataBuilder


class DDTreeCPUMetadataBuilder(CPUAttentionMetadataBuilder):
    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
        metadata = super().build(common_prefix_len, common_attn_metadata, fast_build)
        call = tree_call()
        metadata.tree_call = None
        if call is not None:  # the group's blocks, and the visibility bias every layer shares
            call = call.with_block_table(common_attn_metadata.block_table_tensor, self.block_size)
            metadata.tree_call = call
            metadata.tree_bias = visibility_bias(call, call.block_table.shape[1] * self.block_size, torch.float32)
        return metadata


class DDTreeCPUImpl(CPUAttentionBackendImpl):
    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        call = getattr(attn_metadata, "tree_call", None)
        if call is None:
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                                   output_block_scale)
        if self.kv_cache_dtype != "auto" or self.sinks is not None or self.alibi_slopes is not None or \
                self.sliding_window != -1 or self.logits_soft_cap:
            raise NotImplementedError("ddtree attention: tree verification needs a model-dtype KV cache and "
                                      "no alibi, sliding window, soft cap or sinks")
        if call.others:
            super().forward(layer, query, key, value, kv_cache, attn_metadata, output)
        keys_t, values = gather_blocks(kv_cache, call.block_table.long())
        M, T = call.tree_mask.shape[:2]
        H, d = self.num_heads, self.head_size
        rows = query.view(-1, H, d)
        q = rows[: M * T] if call.dense else rows.index_select(0, call.gather)  # dense: no gather, no padding
        o = tree_attention_torch(q.view(M, T, H, d).transpose(1, 2), keys_t, values, attn_metadata.tree_bias,
                                 self.scale).transpose(1, 2)
        out = output.view(-1, H, d)
        if call.dense:
            out[: M * T].view(M, T, H, d).copy_(o)
        else:
            out[call.rows] = o.reshape(M * T, H, d)[call.picks].to(out.dtype)
        return output
