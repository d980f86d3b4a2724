"""torch.library.opcheck on every op: schema (including the compact ops' mutated lists), fake tensor impls,
autograd registration and AOT dispatch with dynamic shapes, on a few sample inputs each."""
from __future__ import annotations

import math

import pytest
import torch

import ddtree
from conftest import devices

ops = torch.ops.ddtree


def samples_topk(device):
    gen = torch.Generator().manual_seed(0)
    yield (torch.randn(2, 3, 50, generator=gen).to(device), 4, 1.0)
    yield (torch.randn(1, 5, 17, generator=gen).bfloat16().to(device), 17, 0.7)
    yield (torch.randn(3, 1, 8, generator=gen).half().to(device), 1, 2.0)


def tree_inputs(B, D, K, device, seed):
    gen = torch.Generator().manual_seed(seed)
    lp, ids = ddtree.topk_marginals(torch.randn(B, D, 40, generator=gen), K)
    roots = torch.randint(0, 40, (B,), generator=gen)
    ctx = torch.randint(0, 100, (B,), generator=gen)
    return [t.to(device) for t in (lp, ids, roots, ctx)]


def samples_build_tree(device):
    yield (*tree_inputs(2, 4, 3, device, 1), 10, None, 0.0)  # DDTree: fixed budget
    yield (*tree_inputs(1, 1, 1, device, 2), 0, None, 0.0)  # empty tree
    costs = 1.0 + 0.01 * torch.arange(41.0).repeat(3, 1)
    yield (*tree_inputs(3, 5, 4, device, 3), 40, costs.to(device), 0.2)  # CaDDTree: with a cost table
    row = (1.0 + 0.01 * torch.arange(3 * 40 + 1.0))[None].to(device)
    yield (*tree_inputs(3, 5, 4, device, 3), 40, row[:, :41], 0.2, "batch")  # one budget for the batch
    yield (*tree_inputs(3, 5, 4, device, 3), 40, row, 0.2, "ragged")  # the batch's best nodes


def samples_tree_attention(device):
    shapes = [(2, 4, 2, 5, 64, torch.bfloat16), (1, 2, 2, 33, 128, torch.float16)]
    if device == "cpu":  # the CPU kernel also takes fp32 and any head dim
        shapes += [(2, 4, 2, 5, 64, torch.float32), (3, 4, 1, 2, 7, torch.float16)]
    for B, Hq, Hkv, T, d, dtype in shapes:
        gen = torch.Generator().manual_seed(T)
        lp, ids, roots, ctx = tree_inputs(B, 3, 3, "cpu", T)
        ctx = ctx % 20
        tree = ddtree.build_tree(lp, ids, roots, ctx, T - 1)
        S = 20 + T
        q = torch.randn(B, Hq, T, d, generator=gen).to(dtype)
        k = torch.randn(B, Hkv, S, d, generator=gen).to(dtype)
        v = torch.randn(B, Hkv, S, d, generator=gen).to(dtype)
        args = (q, k, v, ctx, tree.tree_mask, tree.num_nodes)
        yield (*(t.to(device) for t in args), 1 / math.sqrt(d))


def samples_accept_tree(device):
    lp, ids, roots, ctx = tree_inputs(3, 4, 3, "cpu", 4)
    tree = ddtree.build_tree(lp, ids, roots, ctx, 20)
    target = tree.tokens.roll(-1, dims=1)  # agrees with some children
    for max_depth in (-1, 2):
        yield (*(t.to(device) for t in (tree.tokens, tree.parents, tree.num_nodes, target)), max_depth)


def samples_compact_kv(device):
    gen = torch.Generator().manual_seed(5)
    caches = [torch.randn(2, 2, 12, 8, generator=gen), torch.randn(2, 1, 12, 4, generator=gen).bfloat16()]
    slots = torch.tensor([[0, 2, 3, -1], [0, 3, 1, 2]])
    args = (torch.tensor([0, 6]), slots, torch.tensor([3, 4], dtype=torch.int32))
    yield ([c.to(device) for c in caches], *(t.to(device) for t in args))
    yield ([caches[0].to(device)], *(t.to(device) for t in args[:2]), torch.zeros(2, dtype=torch.int32, device=device))


def samples_paged_tree_attention(device):
    """The dense samples' inputs, each request's rows placed in scattered blocks of a paged cache."""
    for q, k, v, ctx, mask, nn, scale in samples_tree_attention("cpu"):
        B, Hkv, S, d = k.shape
        block_size = 16 if d % 2 == 0 else 3
        max_blocks = -(-S // block_size)
        table = torch.randperm(B * max_blocks + 1, generator=torch.Generator().manual_seed(S))[1:]
        table = table.view(B, max_blocks).int()
        pad = torch.zeros(B, Hkv, max_blocks * block_size - S, d, dtype=k.dtype)
        paged = []
        for dense in (k, v):
            cache = torch.zeros(B * max_blocks + 1, block_size, Hkv, d, dtype=k.dtype)
            rows = torch.cat([dense, pad], 2).permute(0, 2, 1, 3).reshape(B, max_blocks, block_size, Hkv, d)
            cache[table.long()] = rows
            paged.append(cache)
        yield (*(t.to(device) for t in (q, *paged, table, ctx, mask, nn)), scale)


def samples_paged_compact_kv(device):
    gen = torch.Generator().manual_seed(6)
    caches = [torch.randn(5, 4, 2, 8, generator=gen), torch.randn(5, 4, 1, 4, generator=gen).bfloat16()]
    table = torch.tensor([[3, 0, 4], [1, 2, 0]], dtype=torch.int32)
    slots = torch.tensor([[0, 2, 3, -1], [0, 3, 1, 2]])
    args = (table, torch.tensor([0, 6]), slots, torch.tensor([3, 4], dtype=torch.int32))
    yield ([c.to(device) for c in caches], *(t.to(device) for t in args))
    yield ([caches[0].to(device)], *(t.to(device) for t in args[:3]), torch.zeros(2, dtype=torch.int32, device=device))


CASES = {
    "topk_marginals": samples_topk,
    "build_tree": samples_build_tree,
    "tree_attention": samples_tree_attention,
    "accept_tree": samples_accept_tree,
    "compact_kv": samples_compact_kv,
    "paged_tree_attention": samples_paged_tree_attention,
    "paged_compact_kv": samples_paged_compact_kv,
}


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("name", sorted(CASES))
def test_opcheck(name, device):
    samples = list(CASES[name](device))
    assert samples
    for args in samples:
        torch.library.opcheck(getattr(ops, name).default, args)


@pytest.mark.parametrize("name", ["compact_kv", "paged_compact_kv"])
def test_compact_kv_schema_declares_mutation(name):
    """The caches are annotated as mutated, so functionalisation and torch.compile see the write."""
    schema = getattr(ops, name).default._schema
    caches = schema.arguments[0]
    assert caches.name == "caches" and caches.alias_info is not None and caches.alias_info.is_write
    assert all(a.alias_info is None for a in schema.arguments[1:])
    for name in ("topk_marginals", "build_tree", "tree_attention", "accept_tree", "paged_tree_attention"):
        assert not any(a.alias_info for a in getattr(ops, name).default._schema.arguments), name
