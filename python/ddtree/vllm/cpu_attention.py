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
A verification layer is one ``ddtree.paged_tree_attention`` call on that cache in place
(:func:`paged_kv_views` gives the op its logical ``[num_blocks, block_size, Hkv, d]`` views; the CPU op
reads any strides), under the call's packed tree masks: no block copy, no bias tensor
(bench/RESULTS.md: `bench/bench_vllm_attention.py`).
"""
from __future__ import annotations

import torch

from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadataBuilder,
)

from .tree_call import tree_call


def cpu_kv_views(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CPU_ATTN's per-layer cache as (keys ``[num_blocks, Hkv, d, block_size]``, values
    ``[num_blocks, Hkv, block_size, d]``), both views."""
    nb, h, bs, two_d = kv_cache.shape
    halves = kv_cache.view(nb, h, 2, bs * (two_d // 2))
    return halves[:, :, 0].view(nb, h, two_d // 2, bs), halves[:, :, 1].view(nb, h, bs, two_d // 2)


def paged_kv_views(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The cache as ``ddtree.paged_tree_attention``'s K and V ``[num_blocks, block_size, Hkv, d]``: permuted
    views of :func:`cpu_kv_views` (the keys' position stride is 1), never copied."""
    keys, values = cpu_kv_views(kv_cache)
    return keys.permute(0, 3, 1, 2), values.permute(0, 2, 1, 3)


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
        if call is not None:  # the group's blocks
            call = call.with_block_table(common_attn_metadata.block_table_tensor, self.block_size)
            metadata.tree_call = call
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
        views = self.__dict__.get("_ddtree_views")
        if views is None or views[0] is not kv_cache:  # the layer's cache is allocated once: its views too
            views = self._ddtree_views = (kv_cache, *paged_kv_views(kv_cache))
        _, keys, values = views
        M, T = call.tree_mask.shape[:2]
        H, d = self.num_heads, self.head_size
        rows = query.view(-1, H, d)
        q = rows[: M * T] if call.dense else rows.index_select(0, call.gather)  # dense: no gather, no padding
        # The op's output keeps q's [M, T, H, d] layout: transposed back, it is that buffer again.
        o = torch.ops.ddtree.paged_tree_attention(q.view(M, T, H, d).transpose(1, 2), keys, values,
                                                  call.block_table, call.context_lens, call.tree_mask,
                                                  call.num_nodes, self.scale).transpose(1, 2)
        out = output.view(-1, H, d)
        if call.dense:
            out[: M * T].view(M, T, H, d).copy_(o)
        else:
            out[call.rows] = o.reshape(M * T, H, d)[call.picks].to(out.dtype)
        return output
