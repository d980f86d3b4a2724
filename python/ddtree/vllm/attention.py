"""On CUDA: a vLLM attention backend that runs every attention call through ``ddtree.paged_tree_attention``
(on CPU the plugin keeps vLLM's own backend and adds tree verification: :mod:`ddtree.vllm.cpu_attention`).

vLLM's own backends take a causal or a full mask per request; verifying a draft tree needs each tree slot
to see the context and its own ancestors only. This backend reads vLLM's paged cache in place (per layer
the logical ``[num_blocks, Hkv, block_size, 2 * d]`` view, K and V the two halves of the last dim, any
physical layout) and expresses every request of a batch as a "tree" over its query tokens:

* a prompt chunk or a plain decode step: the causal chain (row i sees query tokens 0..i);
* a non-causal request (the DFlash drafter's block): every query token sees every other;
* the target forward of a step that verifies trees: the runner's :class:`~ddtree.vllm.tree_call.TreeCall`
  (trees, decodes and short prompt chunks in one call; long prompt chunks in calls of their own).

Query token 0 of a request sits at position ``context_len = seq_len - query_len``, so the op's "root" is
the first query token and its context is everything before it. Short requests (decodes, tree
verification) go in one batched call padded to the longest; a long one (a prompt chunk) gets a call of
its own, so a decode is never padded to a prompt's length.
"""
from __future__ import annotations

import functools

from dataclasses import dataclass
from typing import ClassVar

import torch

from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
)

from .. import ops
from .tree_call import tree_call

# Requests with at most this many query tokens share one padded call.
_BATCHED_QUERY_LEN = 64


class DDTreeAttentionBackend(AttentionBackend):
    forward_includes_kv_cache_update: bool = False
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto"]

    @staticmethod
    def get_name() -> str:
        # The registry slot this backend fills (it is registered as an override of that name).
        return DDTreeAttentionBackend._slot_name

    _slot_name: ClassVar[str] = "CPU_ATTN"

    @classmethod
    def supports_non_causal(cls) -> bool:
        return True

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @staticmethod
    def get_impl_cls() -> type["DDTreeAttentionImpl"]:
        return DDTreeAttentionImpl

    @staticmethod
    def get_builder_cls() -> type["DDTreeMetadataBuilder"]:
        return DDTreeMetadataBuilder


@dataclass
class _Call:
    """One paged_tree_attention call: ``B`` requests padded to ``T`` query tokens."""

    rows: torch.Tensor  # [B, T] i64: the flat query row of (request, query token), -1 for padding
    block_table: torch.Tensor  # [B, max_blocks] i32, widened so that context + T fits
    context_lens: torch.Tensor  # [B] i64
    tree_mask: torch.Tensor  # [B, T, ceil(T / 32)] i32
    num_nodes: torch.Tensor  # [B] i32: query tokens - 1


@dataclass
class DDTreeAttentionMetadata:
    num_actual_tokens: int
    slot_mapping: torch.Tensor
    calls: list[_Call]
    causal: bool  # False when any request attends non-causally (vLLM's DFlash drafter checks it)


@functools.lru_cache(maxsize=64)
def chain_mask(T: int, device) -> torch.Tensor:
    """Packed ancestor mask of a chain of T slots: row i sees slots 0..i. Cached per (T, device), since a
    step asks for it every time: read it, never write it."""
    return ops.pack_mask(torch.ones(T, T, dtype=torch.bool, device=device).tril())


class DDTreeMetadataBuilder(AttentionMetadataBuilder[DDTreeAttentionMetadata]):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.block_size = kv_cache_spec.block_size
        spec = vllm_config.speculative_config
        self.batched_query_len = max(_BATCHED_QUERY_LEN, 1 + (spec.num_speculative_tokens or 0) if spec else 0)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> DDTreeAttentionMetadata:
        cad = common_attn_metadata
        B = cad.num_reqs
        starts = cad.query_start_loc_cpu[: B + 1].tolist()
        seq_lens = cad.seq_lens[:B].tolist()
        q_lens = [starts[i + 1] - starts[i] for i in range(B)]
        causal = cad.causal
        if isinstance(causal, torch.Tensor):
            causal = causal[:B].tolist()
        else:
            causal = [bool(causal)] * B
        verify = tree_call()
        if verify is not None:  # the trees' call, and the long prompt chunks beside them one by one
            verify = verify.with_block_table(cad.block_table_tensor, self.block_size)
            inside = set(verify.members_np.tolist())
            calls = [_Call(verify.slots, verify.block_table, verify.context_lens, verify.tree_mask, verify.num_nodes)]
            calls += [self._call([b], starts, q_lens, seq_lens, causal, cad.block_table_tensor)
                      for b in range(B) if q_lens[b] > 0 and b not in inside]
            return DDTreeAttentionMetadata(cad.num_actual_tokens, cad.slot_mapping, calls, all(causal))
        short = [b for b in range(B) if 0 < q_lens[b] <= self.batched_query_len]
        groups = ([short] if short else []) + [[b] for b in range(B) if q_lens[b] > self.batched_query_len]
        calls = [self._call(g, starts, q_lens, seq_lens, causal, cad.block_table_tensor) for g in groups]
        return DDTreeAttentionMetadata(cad.num_actual_tokens, cad.slot_mapping, calls, all(causal))

    def _call(self, reqs, starts, q_lens, seq_lens, causal, block_table) -> _Call:
        device = block_table.device
        T = max(q_lens[b] for b in reqs)
        W = (T + 31) // 32
        chain = chain_mask(T, device)
        rows = torch.full((len(reqs), T), -1, dtype=torch.long)
        mask = torch.zeros(len(reqs), T, W, dtype=torch.int32, device=device)
        for i, b in enumerate(reqs):
            n = q_lens[b]
            rows[i, :n] = torch.arange(starts[b], starts[b] + n)
            if causal[b]:
                mask[i, :n] = chain[:n]  # row j of the chain holds bits 0..j only: none past n
            else:
                mask[i, :n] = ops.pack_mask((torch.arange(T, device=device) < n).expand(n, T))
        ctx = torch.tensor([seq_lens[b] - q_lens[b] for b in reqs], dtype=torch.long, device=device)
        table = block_table[torch.tensor(reqs, device=device)].to(torch.int32)
        need = (int(ctx.max()) + T + self.block_size - 1) // self.block_size
        if need > table.shape[1]:  # padding rows may reach past the table; their blocks are never read
            table = torch.cat([table, table.new_zeros(table.shape[0], need - table.shape[1])], dim=1)
        num_nodes = torch.tensor([q_lens[b] - 1 for b in reqs], dtype=torch.int32, device=device)
        return _Call(rows.to(device), table.contiguous(), ctx, mask, num_nodes)


def kv_views(kv_cache: torch.Tensor, head_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V as ``[num_blocks, block_size, Hkv, d]`` views of vLLM's per-layer cache."""
    return kv_cache.transpose(1, 2).split(head_size, dim=-1)


def move_cache_rows(kv_cache: torch.Tensor, src_blocks, src_offsets, dst_blocks, dst_offsets) -> None:
    """Move the key and value rows (block, offset) -> (block, offset) of one layer's cache, every read
    before any write."""
    for cache in kv_views(kv_cache, kv_cache.shape[-1] // 2):
        cache[dst_blocks, dst_offsets] = cache[src_blocks, src_offsets]


class DDTreeAttentionImpl(AttentionImpl):
    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int,
                 alibi_slopes, sliding_window, kv_cache_dtype: str, logits_soft_cap=None,
                 attn_type: str = AttentionType.DECODER, kv_sharing_target_layer_name=None, sinks=None):
        unsupported = {"alibi_slopes": alibi_slopes, "sliding_window": sliding_window,
                       "logits_soft_cap": logits_soft_cap or None, "sinks": sinks}
        named = [k for k, v in unsupported.items() if v is not None]
        if named or attn_type != AttentionType.DECODER:
            raise NotImplementedError(f"ddtree attention: {', '.join(named) or attn_type} not supported "
                                      "(decoder self-attention without alibi, sliding window, soft cap or sinks)")
        if kv_cache_dtype not in ("auto",):
            raise NotImplementedError(f"ddtree attention: kv_cache_dtype {kv_cache_dtype!r} not supported "
                                      "(the cache must hold the model's dtype)")
        self.num_heads, self.head_size, self.scale = num_heads, head_size, float(scale)
        self.num_kv_heads = num_kv_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name
        self.attn_type = attn_type

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        key_cache, value_cache = kv_views(kv_cache, self.head_size)
        n = slot_mapping.shape[0]
        slots = slot_mapping.long()
        keep = slots >= 0
        blocks, offsets = slots[keep] // key_cache.shape[1], slots[keep] % key_cache.shape[1]
        key_cache[blocks, offsets] = key[:n][keep]
        value_cache[blocks, offsets] = value[:n][keep]

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("ddtree attention: fused output quantization not supported")
        if attn_metadata is None:  # profiling run
            return output
        key_cache, value_cache = kv_views(kv_cache, self.head_size)
        out = output.view(output.shape[0], self.num_heads, self.head_size)
        for call in attn_metadata.calls:
            valid = call.rows >= 0
            flat = call.rows.clamp(min=0)
            q = query[flat].masked_fill(~valid[..., None, None], 0)  # [B, T, Hq, d]
            o = ops.paged_tree_attention(q.transpose(1, 2), key_cache, value_cache, call.block_table,
                                         call.context_lens, call.tree_mask, call.num_nodes, self.scale)
            out[call.rows[valid]] = o.transpose(1, 2)[valid].to(out.dtype)
        return output
