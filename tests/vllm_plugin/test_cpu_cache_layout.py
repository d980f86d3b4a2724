"""The plugin's reading and moving of vLLM's CPU_ATTN cache, against what vLLM's own kernel writes there.

No engine: keys and values go in through vLLM's ``cpu_attn_reshape_and_cache`` (the write every CPU_ATTN
layer does), then the plugin's views must find them at their positions. Skipped without vLLM.
"""
import pytest

pytest.importorskip("vllm.v1")

import torch  # noqa: E402

from vllm import _custom_ops as vllm_ops  # noqa: E402

from ddtree.vllm.cpu_attention import cpu_kv_views, gather_dense, move_cache_rows  # noqa: E402

NUM_BLOCKS, HEADS, BLOCK, D = 6, 2, 32, 32


def written_cache(positions_of_slots, keys, values):
    """A CPU_ATTN cache with keys/values [n, H, d] written at the given slots (block * BLOCK + offset)."""
    cache = torch.zeros(NUM_BLOCKS, HEADS, BLOCK, 2 * D)
    kc, vc = cache.view(NUM_BLOCKS, HEADS, 2 * BLOCK, D).chunk(2, dim=2)  # as CPU_ATTN splits it
    vllm_ops.cpu_attn_reshape_and_cache(keys, values, kc, vc, torch.tensor(positions_of_slots), "vec")
    return cache


def test_gather_dense_finds_what_vllm_wrote():
    torch.manual_seed(0)
    # Request 0 owns blocks 4, 1; request 1 owns block 2, 5. Positions 0..63 of each.
    table = torch.tensor([[4, 1], [2, 5]])
    slots = [int(table[b, p // BLOCK]) * BLOCK + p % BLOCK for b in range(2) for p in range(2 * BLOCK)]
    keys, values = torch.randn(len(slots), HEADS, D), torch.randn(len(slots), HEADS, D)
    cache = written_cache(slots, keys, values)
    k, v = gather_dense(cache, table)
    assert k.shape == (2, HEADS, 2 * BLOCK, D)
    want_k = keys.view(2, 2 * BLOCK, HEADS, D).transpose(1, 2)
    want_v = values.view(2, 2 * BLOCK, HEADS, D).transpose(1, 2)
    assert torch.equal(k, want_k) and torch.equal(v, want_v)


def test_move_cache_rows_reads_before_writing():
    torch.manual_seed(1)
    slots = list(range(NUM_BLOCKS * BLOCK))
    keys, values = torch.randn(len(slots), HEADS, D), torch.randn(len(slots), HEADS, D)
    cache = written_cache(slots, keys, values)
    # Swap slots 33 and 70, copy 5 -> 6, and copy slot 7 onto itself.
    src, dst = torch.tensor([33, 70, 5, 7]), torch.tensor([70, 33, 6, 7])
    move_cache_rows(cache, src // BLOCK, src % BLOCK, dst // BLOCK, dst % BLOCK)
    want_k, want_v = keys.clone(), values.clone()
    want_k[dst], want_v[dst] = keys[src], values[src]
    k, v = cpu_kv_views(cache)  # [nb, H, d, bs], [nb, H, bs, d]
    got_k = k.permute(0, 3, 1, 2).reshape(-1, HEADS, D)
    got_v = v.permute(0, 2, 1, 3).reshape(-1, HEADS, D)
    assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)
