"""The plugin's reading and moving of vLLM's CPU_ATTN cache, against what vLLM's own kernel writes there.

No engine: keys and values go in through vLLM's ``cpu_attn_reshape_and_cache`` (the write every CPU_ATTN
layer does), then the plugin's views must find them at their positions. Skipped without vLLM.
"""
import pytest

pytest.importorskip("vllm.v1")

import torch  # noqa: E402

from vllm import _custom_ops as vllm_ops  # noqa: E402

from ddtree import ops  # noqa: E402
from ddtree.vllm.cpu_attention import paged_kv_views  # noqa: E402

NUM_BLOCKS, HEADS, BLOCK, D = 6, 2, 32, 32


def written_cache(positions_of_slots, keys, values):
    """A CPU_ATTN cache with keys/values [n, H, d] written at the given slots (block * BLOCK + offset)."""
    cache = torch.zeros(NUM_BLOCKS, HEADS, BLOCK, 2 * D)
    kc, vc = cache.view(NUM_BLOCKS, HEADS, 2 * BLOCK, D).chunk(2, dim=2)  # as CPU_ATTN splits it
    vllm_ops.cpu_attn_reshape_and_cache(keys, values, kc, vc, torch.tensor(positions_of_slots), "vec")
    return cache


def test_paged_views_find_what_vllm_wrote():
    torch.manual_seed(0)
    # Request 0 owns blocks 4, 1; request 1 owns block 2, 5. Positions 0..63 of each.
    table = torch.tensor([[4, 1], [2, 5]])
    slots = [int(table[b, p // BLOCK]) * BLOCK + p % BLOCK for b in range(2) for p in range(2 * BLOCK)]
    keys, values = torch.randn(len(slots), HEADS, D), torch.randn(len(slots), HEADS, D)
    cache = written_cache(slots, keys, values)
    k, v = paged_kv_views(cache)  # [num_blocks, BLOCK, H, d] views
    assert k.shape == v.shape == (NUM_BLOCKS, BLOCK, HEADS, D)
    assert k.data_ptr() == cache.data_ptr(), "a view of the cache, not a copy"
    rows = table.reshape(-1).long()
    assert torch.equal(k[rows].reshape(-1, HEADS, D), keys) and torch.equal(v[rows].reshape(-1, HEADS, D), values)


@pytest.mark.parametrize("seed", range(3))
def test_tree_verification_on_the_cache_equals_tree_attention(seed):
    # Three requests at different contexts, one tree each (one cut to fewer nodes than the call's slots),
    # through the cache as vLLM writes it, against ddtree's tree_attention on the same keys and values.
    g = torch.Generator().manual_seed(seed)
    Hq, T = 2 * HEADS, 9
    ctx = torch.tensor([5, 40, 0])
    nodes = torch.tensor([8, 3, 8], dtype=torch.int32)
    lp, ids = ops.topk_marginals(torch.randn(3, 6, 30, generator=g) * 3, 4)
    tree = ops.build_tree(lp, ids, torch.tensor([1, 2, 3]), ctx, T - 1)
    mask = tree.tree_mask[:, :T].contiguous()
    table = torch.tensor([[3, 0], [1, 5], [4, 2]])
    S = 2 * BLOCK
    keys, values = torch.randn(3, S, HEADS, D, generator=g), torch.randn(3, S, HEADS, D, generator=g)
    slots = [int(table[b, p // BLOCK]) * BLOCK + p % BLOCK for b in range(3) for p in range(S)]
    cache = written_cache(slots, keys.reshape(-1, HEADS, D), values.reshape(-1, HEADS, D))
    q = torch.randn(3, Hq, T, D, generator=g)
    k, v = paged_kv_views(cache)
    got = ops.paged_tree_attention(q, k, v, table.to(torch.int32), ctx, mask, nodes, 0.125)
    want = ops.tree_attention(q, keys.transpose(1, 2), values.transpose(1, 2), ctx, mask, nodes, 0.125)
    for b in range(3):  # the real slots only (padding rows are discarded by the backend)
        n = int(nodes[b]) + 1
        torch.testing.assert_close(got[b, :, :n], want[b, :, :n], rtol=1e-5, atol=1e-5)


def test_accepted_paths_move_on_the_cache_in_place():
    """The runner's KV move on CPU: paged_compact_kv over every layer's paged_kv_views, on what vLLM wrote.
    Request 0 (context 28, blocks 1, 4) accepts slots 0, 3, 1, 2 (positions 29-31 read and overwritten, across
    its block boundary at 32); request 1 (context 5, block 0) accepts 0, 1 (in place)."""
    torch.manual_seed(1)
    slots = list(range(NUM_BLOCKS * BLOCK))
    keys, values = torch.randn(len(slots), HEADS, D), torch.randn(len(slots), HEADS, D)
    caches = [written_cache(slots, keys, values), written_cache(slots, 2 * keys, 2 * values)]
    table = torch.tensor([[1, 4], [0, 2]], dtype=torch.int32)
    accepted = torch.tensor([[0, 3, 1, 2], [0, 1, -1, -1]])
    ops.paged_compact_kv([view for c in caches for view in paged_kv_views(c)], table, torch.tensor([28, 5]),
                         accepted, torch.tensor([4, 2], dtype=torch.int32))
    slot_of = lambda b, p: int(table[b, p // BLOCK]) * BLOCK + p % BLOCK  # noqa: E731
    want_k, want_v = keys.clone(), values.clone()
    for i, a in enumerate([0, 3, 1, 2]):
        want_k[slot_of(0, 28 + i)], want_v[slot_of(0, 28 + i)] = keys[slot_of(0, 28 + a)], values[slot_of(0, 28 + a)]
    for scale, cache in zip((1, 2), caches):
        k, v = paged_kv_views(cache)  # [num_blocks, BLOCK, H, d]
        assert torch.equal(k.reshape(-1, HEADS, D), scale * want_k)
        assert torch.equal(v.reshape(-1, HEADS, D), scale * want_v)
