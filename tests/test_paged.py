"""paged_tree_attention and paged_compact_kv against the dense ops.

Random dense caches ``[B, H, S, d]`` are scattered into paged caches ``[num_blocks, block_size, H, d]``
(ops.h: position p of request b in block ``block_table[b, p // block_size]`` at offset ``p % block_size``)
through random, non-contiguous block tables with spare blocks nobody owns; the paged ops must then do
exactly what the dense ops do on the dense caches, and touch nothing else.
"""
from __future__ import annotations

import math

import pytest
import torch

import ddtree
import reference as ref
from conftest import devices, gpu
from inputs import context_lens, seed_of
from test_tree_attention import make_qkv, make_tree, skip_outside_cuda_contract, tolerance

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def make_table(B: int, max_blocks: int, spare: int, gen: torch.Generator) -> tuple[torch.Tensor, int]:
    """``[B, max_blocks]`` i32: a random permutation of the blocks, so a request's blocks are scattered
    and out of order, plus ``spare`` blocks no request owns. Returns the table and num_blocks."""
    num_blocks = B * max_blocks + spare
    perm = torch.randperm(num_blocks, generator=gen)
    return perm[: B * max_blocks].view(B, max_blocks).int(), num_blocks


def page(dense: torch.Tensor, table: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Writes ``dense [B, H, S, d]`` into the paged cache ``out [num_blocks, block_size, H, d]`` through
    ``table`` (``S <= max_blocks * block_size``); rows no request owns keep their value. Returns ``out``."""
    B, H, S, d = dense.shape
    max_blocks, block_size = table.shape[1], out.shape[1]
    padded = torch.zeros(B, H, max_blocks * block_size, d, dtype=dense.dtype)
    padded[:, :, :S] = dense
    rows = padded.permute(0, 2, 1, 3).reshape(B, max_blocks, block_size, H, d)
    out[table.long()] = rows.to(out.device)
    return out


def garbage_paged(num_blocks: int, block_size: int, H: int, d: int, dtype: torch.dtype, gen: torch.Generator):
    return (100 * torch.randn(num_blocks, block_size, H, d, generator=gen)).to(dtype)


# --------------------------------------------------------------------------------------------------
# paged_tree_attention

ATTENTION_SHAPES = [  # B, Hq, Hkv, T, d
    (1, 1, 1, 1, 64),
    (3, 4, 2, 9, 64),
    (4, 8, 1, 20, 128),
    (2, 4, 4, 33, 64),
    (5, 6, 3, 5, 16),  # CPU only: any head dim
]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [1, 16, 32])
@pytest.mark.parametrize("shape", ATTENTION_SHAPES)
def test_paged_tree_attention_matches_dense(shape, block_size, dtype, device):
    B, Hq, Hkv, T, d = shape
    skip_outside_cuda_contract(device, dtype, d)
    gen = torch.Generator().manual_seed(seed_of("paged attention", shape, block_size, dtype))
    ctx = context_lens(B, 70, gen)  # ragged, the first one 0
    tree = make_tree(B, T, gen, ctx, shrink=True)  # some trees stop early: rows past num_nodes
    S = int(ctx.max()) + T + int(torch.randint(0, 5, (1,), generator=gen))
    q, k, v = make_qkv(B, Hq, Hkv, T, d, S, dtype, gen)
    max_blocks = math.ceil(S / block_size) + int(torch.randint(0, 3, (1,), generator=gen))
    table, num_blocks = make_table(B, max_blocks, 3, gen)
    # vLLM's allocation: K and V are the two halves of one [2, num_blocks, block_size, Hkv, d] tensor.
    kv = torch.stack([garbage_paged(num_blocks, block_size, Hkv, d, dtype, gen) for _ in range(2)])
    page(k, table, kv[0])
    page(v, table, kv[1])
    # Entries past the blocks a request reads are never looked at: garbage there changes nothing.
    for b in range(B):
        used = (int(ctx[b]) + int(tree.num_nodes[b])) // block_size + 1
        table[b, used:] = torch.randint(-5, 2**31 - 1, (max_blocks - used,), generator=gen, dtype=torch.int32)

    scale = 1 / math.sqrt(d)
    common = [t.to(device) for t in (ctx, tree.tree_mask, tree.num_nodes)]
    paged = ddtree.paged_tree_attention(q.to(device), kv[0].to(device), kv[1].to(device), table.to(device), *common,
                                        scale)
    dense = ddtree.tree_attention(q.to(device), k.to(device), v.to(device), *common, scale)
    assert paged.shape == q.shape and paged.dtype == dtype and paged.device.type == device
    paged, dense = paged.cpu(), dense.cpu()
    expected = ref.tree_attention(q, k, v, ctx, tree.tree_mask, tree.num_nodes, scale)
    tol = tolerance(dtype)
    for b in range(B):
        n = int(tree.num_nodes[b])
        vmax = float(v[b, :, : int(ctx[b]) + n + 1].double().abs().max())
        got, exp = paged[b, :, : n + 1].double(), expected[b, :, : n + 1]
        err = (got - exp).abs()
        assert (err <= tol * (vmax + exp.abs())).all(), f"request {b}: max error {float(err.max())}"
        # The dense op on the same keys: both are within tol of the exact result, so within 2 tol of each other.
        gap = (got - dense[b, :, : n + 1].double()).abs()
        assert (gap <= 2 * tol * (vmax + exp.abs())).all(), f"request {b}: paged vs dense {float(gap.max())}"
        assert torch.isfinite(paged[b, :, n + 1:]).all(), "rows past num_nodes must be finite"


@pytest.mark.parametrize("device", devices())
def test_paged_tree_attention_empty_rows_and_full_table(device):
    """Rows whose mask is empty with no context see nothing (zeros); a context that fills the table up
    to the last tree slot (ctx + T = max_blocks * block_size) reads the table's last entry."""
    gen = torch.Generator().manual_seed(11)
    B, Hq, Hkv, T, d, block_size, max_blocks = 2, 2, 1, 4, 64, 16, 3
    ctx = torch.tensor([0, max_blocks * block_size - T])
    mask = torch.zeros(B, T, 1, dtype=torch.int32)
    mask[1] = torch.tensor([[1], [3], [5], [15]], dtype=torch.int32)
    num_nodes = torch.tensor([T - 1, T - 1], dtype=torch.int32)
    S = max_blocks * block_size
    q, k, v = make_qkv(B, Hq, Hkv, T, d, S, torch.bfloat16, gen)
    table, num_blocks = make_table(B, max_blocks, 0, gen)
    kp = page(k, table, garbage_paged(num_blocks, block_size, Hkv, d, torch.bfloat16, gen))
    vp = page(v, table, garbage_paged(num_blocks, block_size, Hkv, d, torch.bfloat16, gen))
    args = [t.to(device) for t in (q, kp, vp, table, ctx, mask, num_nodes)]
    out = ddtree.paged_tree_attention(*args, 0.125).cpu()
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    expected = ref.tree_attention(q, k, v, ctx, mask, num_nodes, 0.125)
    vmax = float(v[1].double().abs().max())
    assert ((out[1].double() - expected[1]).abs() <= tolerance(torch.bfloat16) * (vmax + expected[1].abs())).all()


def cpu_attn_views(cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's CPU backend (CPU_ATTN) cache ``[num_blocks, Hkv, block_size, 2 d]``, per (block, head) the keys
    transposed ``[d, block_size]`` then the values ``[block_size, d]``, as the op's logical
    ``[num_blocks, block_size, Hkv, d]`` K and V views (no copy: keys with position stride 1)."""
    nb, h, bs, two_d = cache.shape
    halves = cache.view(nb, h, 2, bs * (two_d // 2))
    keys = halves[:, :, 0].view(nb, h, two_d // 2, bs).permute(0, 3, 1, 2)
    values = halves[:, :, 1].view(nb, h, bs, two_d // 2).permute(0, 2, 1, 3)
    return keys, values


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [1, 16, 128])
@pytest.mark.parametrize("shape", [(1, 2, 1, 8, 64), (6, 4, 2, 9, 32), (3, 16, 8, 17, 128), (64, 2, 1, 8, 64)])
def test_paged_tree_attention_reads_cpu_attn_layout_in_place(shape, block_size, dtype, threads):
    """CPU: the caches are read through their strides, whatever they are: CPU_ATTN's transposed keys and a
    query that is a transposed view of the engine's [tokens, Hq, d] rows (the plugin's call), against the
    float64 reference; the output keeps the query's layout. Shapes span the op's serial and parallel
    sizes; 64 requests of 8 slots is a batch-64 verification of the shipped pair."""
    B, Hq, Hkv, T, d = shape
    gen = torch.Generator().manual_seed(seed_of("cpu_attn layout", shape, block_size, dtype))
    ctx = context_lens(B, 300, gen)
    tree = make_tree(B, T, gen, ctx, shrink=True)
    S = int(ctx.max()) + T
    q, k, v = make_qkv(B, Hq, Hkv, T, d, S, dtype, gen)
    max_blocks = math.ceil(S / block_size)
    table, num_blocks = make_table(B, max_blocks, 2, gen)
    cache = (100 * torch.randn(num_blocks, Hkv, block_size, 2 * d, generator=gen)).to(dtype)
    keys, values = cpu_attn_views(cache)
    page(k, table, keys)
    page(v, table, values)
    rows = q.transpose(1, 2).contiguous()  # [B, T, Hq, d], as the engine holds its query rows
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = ddtree.paged_tree_attention(rows.transpose(1, 2), keys, values, table, ctx, tree.tree_mask,
                                          tree.num_nodes, 1 / math.sqrt(d))
    finally:
        torch.set_num_threads(before)
    assert out.shape == q.shape and out.transpose(1, 2).is_contiguous()
    expected = ref.tree_attention(q, k, v, ctx, tree.tree_mask, tree.num_nodes, 1 / math.sqrt(d))
    tol = tolerance(dtype)
    for b in range(B):
        n = int(tree.num_nodes[b])
        vmax = float(v[b, :, : int(ctx[b]) + n + 1].double().abs().max())
        got, exp = out[b, :, : n + 1].double(), expected[b, :, : n + 1]
        err = (got - exp).abs()
        assert (err <= tol * (vmax + exp.abs())).all(), f"request {b}: max error {float(err.max())}"
        assert torch.isfinite(out[b, :, n + 1:]).all(), "rows past num_nodes must be finite"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_tree_attention_never_reads_an_unseen_slot(dtype):
    """CPU: a tree slot's key and value are read only for the rows that see it. With NaN in the last slot's K
    and V (seen by itself alone: no node comes after it), every other row equals the reference computed with
    finite values there, and the last row is NaN."""
    gen = torch.Generator().manual_seed(5)
    B, Hq, Hkv, T, d, block_size = 3, 4, 2, 9, 32, 16
    ctx = torch.tensor([0, 20, 37])
    tree = make_tree(B, T, gen, ctx)
    S = int(ctx.max()) + T
    q, k, v = make_qkv(B, Hq, Hkv, T, d, S, dtype, gen)
    table, num_blocks = make_table(B, math.ceil(S / block_size), 1, gen)
    cache = torch.zeros(num_blocks, Hkv, block_size, 2 * d, dtype=dtype)
    keys, values = cpu_attn_views(cache)
    k_nan, v_nan = k.clone(), v.clone()
    for b in range(B):
        last = int(ctx[b]) + int(tree.num_nodes[b])
        k_nan[b, :, last], v_nan[b, :, last] = float("nan"), float("nan")
    page(k_nan, table, keys)
    page(v_nan, table, values)
    out = ddtree.paged_tree_attention(q, keys, values, table, ctx, tree.tree_mask, tree.num_nodes, 0.2)
    expected = ref.tree_attention(q, k, v, ctx, tree.tree_mask, tree.num_nodes, 0.2)
    for b in range(B):
        n = int(tree.num_nodes[b])
        assert n >= 1, "the test needs a tree with nodes"
        vmax = float(v[b].double().abs().max())
        got, exp = out[b, :, :n].double(), expected[b, :, :n]
        assert ((got - exp).abs() <= tolerance(dtype) * (vmax + exp.abs())).all(), f"request {b}"
        assert torch.isnan(out[b, :, n]).all(), "the slot's own row sees its NaN"


# --------------------------------------------------------------------------------------------------
# paged_compact_kv

LAYERS = [(2, 8, torch.float32), (1, 64, torch.bfloat16), (4, 16, torch.float16)]  # H, d, dtype


def make_slots(kind: str, B: int, A: int, T: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """accepted_slots ``[B, A]`` (-1 padded) and accept_len ``[B]`` (0 and A included). ``path``: strictly
    increasing from 0, as accept_tree returns; ``any``: arbitrary slots in [0, T): duplicates, reversals,
    slots below i, so sources and destinations overlap."""
    slots = torch.full((B, A), -1, dtype=torch.int64)
    alen = torch.randint(0, A + 1, (B,), generator=gen, dtype=torch.int32)
    alen[0], alen[-1] = A, 0 if B > 1 else A
    for b in range(B):
        a = int(alen[b])
        if kind == "path":
            picks = torch.randperm(T - 1, generator=gen)[: a - 1].sort().values + 1 if a > 0 else torch.tensor([])
            slots[b, :a] = torch.cat([torch.zeros(min(a, 1), dtype=torch.int64), picks.long()])[:a]
        else:
            slots[b, :a] = torch.randint(0, T, (a,), generator=gen)
            if b % 2 == 1:
                slots[b, :a] = torch.arange(a).flip(0)  # reversal: every row both read and overwritten
    return slots, alen


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("block_size", [1, 16, 32])
@pytest.mark.parametrize("kind", ["path", "any"])
@pytest.mark.parametrize("B", [1, 4])
def test_paged_compact_kv_matches_dense(B, kind, block_size, device):
    gen = torch.Generator().manual_seed(seed_of("paged compact", B, kind, block_size))
    T, A = 12, 7
    ctx = context_lens(B, 50, gen)
    S = int(ctx.max()) + T + 3
    max_blocks = math.ceil(S / block_size) + 1
    table, num_blocks = make_table(B, max_blocks, 2, gen)
    dense = [torch.randn(B, H, S, d, generator=gen).to(dtype) for H, d, dtype in LAYERS]
    # vLLM's allocation for the last layer: K and V as halves of one tensor.
    paged = [page(c, table, garbage_paged(num_blocks, block_size, H, d, dtype, gen))
             for c, (H, d, dtype) in zip(dense, LAYERS)]
    H, d, dtype = LAYERS[0]
    kv = torch.stack([garbage_paged(num_blocks, block_size, H, d, dtype, gen) for _ in range(2)])
    for half in kv:
        dense.append(torch.randn(B, H, S, d, generator=gen).to(dtype))
        page(dense[-1], table, half)
    slots, alen = make_slots(kind, B, A, T, gen)

    expected = [p.clone() for p in paged] + [kv.clone()]
    for e, c in zip(expected[:-1] + [expected[-1][0], expected[-1][1]], ref.compact_kv(dense, ctx, slots, alen)):
        page(c, table, e)  # what the paged caches must hold: every other byte unchanged

    kv_dev = kv.to(device)
    caches = [p.to(device) for p in paged] + [kv_dev[0], kv_dev[1]]
    ddtree.paged_compact_kv(caches, *(t.to(device) for t in (table, ctx, slots, alen)))
    for i, (got, want) in enumerate(zip(caches[: len(paged)] + [kv_dev], expected)):
        assert torch.equal(got.cpu(), want), f"cache {i}"


@pytest.mark.parametrize("block_size", [1, 16, 128])
@pytest.mark.parametrize("dtype", DTYPES)
def test_paged_compact_kv_moves_cpu_attn_rows_in_place(block_size, dtype):
    """CPU: caches read and written through any strides, here CPU_ATTN's (keys transposed per block and
    head, as permuted views of one [num_blocks, H, block_size, 2 d] tensor): every accepted row of K and V
    where the dense compact_kv puts it, every other byte of the cache unchanged."""
    gen = torch.Generator().manual_seed(seed_of("cpu_attn compact", block_size, dtype))
    B, H, d, T, A = 4, 2, 32, 12, 7
    ctx = context_lens(B, 150, gen)
    S = int(ctx.max()) + T
    max_blocks = math.ceil(S / block_size)
    table, num_blocks = make_table(B, max_blocks, 2, gen)
    cache = (100 * torch.randn(num_blocks, H, block_size, 2 * d, generator=gen)).to(dtype)
    keys, values = cpu_attn_views(cache)
    dense = [torch.randn(B, H, S, d, generator=gen).to(dtype) for _ in range(2)]
    page(dense[0], table, keys)
    page(dense[1], table, values)
    slots, alen = make_slots("any", B, A, T, gen)
    expected = cache.clone()
    want_k, want_v = cpu_attn_views(expected)
    for view, c in zip((want_k, want_v), ref.compact_kv(dense, ctx, slots, alen)):
        page(c, table, view)
    ddtree.paged_compact_kv([keys, values], table, ctx, slots, alen)
    assert torch.equal(cache, expected)


@gpu
def test_paged_compact_kv_cuda_needs_contiguous_rows():
    args = compact_args(caches=[torch.randn(6, 4, 8, 2, device="cuda").transpose(2, 3)])
    args[1:] = [t.cuda() for t in args[1:]]
    with pytest.raises(RuntimeError, match=r"paged_compact_kv: .*caches\[0\] must be contiguous in its last"):
        ddtree.paged_compact_kv(*args)


@pytest.mark.parametrize("device", devices())
def test_paged_compact_kv_nothing_to_do(device):
    gen = torch.Generator().manual_seed(3)
    table, num_blocks = make_table(2, 2, 0, gen)
    cache = garbage_paged(num_blocks, 4, 1, 8, torch.float32, gen).to(device)
    before = cache.clone()
    slots = torch.tensor([[0, 1], [1, 0]], device=device)
    ctx = torch.tensor([0, 3], device=device)
    ddtree.paged_compact_kv([cache], table.to(device), ctx, slots, torch.zeros(2, dtype=torch.int32, device=device))
    ddtree.paged_compact_kv([], table.to(device), ctx, slots, torch.ones(2, dtype=torch.int32, device=device))
    assert torch.equal(cache, before)


# --------------------------------------------------------------------------------------------------
# bad input: a clear error naming the argument


def attention_args(**change):
    gen = torch.Generator().manual_seed(0)
    B, Hq, Hkv, T, d, block_size, max_blocks = 2, 4, 2, 3, 8, 4, 3
    args = dict(
        q=torch.randn(B, Hq, T, d, generator=gen),
        k_cache=torch.randn(7, block_size, Hkv, d, generator=gen),
        v_cache=torch.randn(7, block_size, Hkv, d, generator=gen),
        block_table=torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32),
        context_lens=torch.tensor([0, 5]),
        tree_mask=torch.tensor([[[1], [3], [5]]] * B, dtype=torch.int32),
        num_nodes=torch.tensor([2, 2], dtype=torch.int32),
        scale=0.3,
    )
    assert block_size * max_blocks >= 5 + T
    args.update(change)
    return list(args.values())


ATTENTION_ERRORS = [
    (dict(block_table=torch.tensor([[0, 1, 2], [3, 4, 5]])), "block_table must be Int"),
    (dict(block_table=torch.tensor([[0, 1, 2]], dtype=torch.int32)), r"block_table.size\(0\)"),
    (dict(block_table=torch.tensor([0, 1, 2], dtype=torch.int32)), "block_table must have 2 dimensions"),
    (dict(block_table=torch.zeros(2, 0, dtype=torch.int32)), "block_table addresses 0 positions"),
    (dict(context_lens=torch.tensor([0, 10])), r"context_lens\[1\] = 10 does not fit the block table"),
    (dict(context_lens=torch.tensor([-1, 0])), r"context_lens\[0\] = -1 must be non-negative"),
    (dict(block_table=torch.tensor([[0, 1, 2], [3, -1, 5]], dtype=torch.int32)), r"block_table\[1, 1\] = -1"),
    (dict(block_table=torch.tensor([[7, 1, 2], [3, 4, 5]], dtype=torch.int32)), r"block_table\[0, 0\] = 7"),
    (dict(k_cache=torch.randn(7, 4, 3, 8), v_cache=torch.randn(7, 4, 3, 8)),
     r"multiple of the key/value heads k_cache.size\(2\)"),
    (dict(v_cache=torch.randn(7, 4, 2, 4)), "v_cache shape"),
    (dict(k_cache=torch.randn(7, 4, 2, 8).half()), "k_cache must be Float, got Half"),
    (dict(k_cache=torch.randn(0, 4, 2, 8), v_cache=torch.randn(0, 4, 2, 8)), "at least one block"),
    (dict(num_nodes=torch.tensor([3, 2], dtype=torch.int32)), r"num_nodes\[0\] = 3"),
    (dict(tree_mask=torch.zeros(2, 3, 2, dtype=torch.int32)), r"tree_mask.size\(2\)"),
    (dict(scale=float("nan")), "scale must be finite"),
]


@pytest.mark.parametrize("change,message", ATTENTION_ERRORS)
def test_paged_tree_attention_errors(change, message):
    with pytest.raises(RuntimeError, match=f"paged_tree_attention: .*({message})"):
        ddtree.paged_tree_attention(*attention_args(**change))


def test_paged_tree_attention_unread_table_entries_are_not_checked():
    """Only the blocks of positions [0, ctx + num_nodes] need valid ids."""
    table = torch.tensor([[0, -9, 99], [3, 4, 5]], dtype=torch.int32)
    out = ddtree.paged_tree_attention(*attention_args(block_table=table, num_nodes=torch.tensor([2, 2],
                                                                                              dtype=torch.int32)))
    assert torch.isfinite(out).all()


def test_paged_compact_kv_unused_table_entries_are_not_checked():
    """Only the blocks of the positions read and written need valid ids: request 0 stays in block 0."""
    args = compact_args(block_table=torch.tensor([[0, -1], [2, 3]], dtype=torch.int32))
    expected = args[0][0].clone()
    expected[0, 1:3] = args[0][0][0, 2:4]  # positions 1, 2 <- 2, 3 (block 0); request 1: 3, 4 <- 3, 4
    ddtree.paged_compact_kv(*args)
    assert torch.equal(args[0][0], expected)


def compact_args(**change):
    gen = torch.Generator().manual_seed(0)
    args = dict(
        caches=[torch.randn(6, 4, 2, 8, generator=gen), torch.randn(6, 4, 1, 16, generator=gen).half()],
        block_table=torch.tensor([[0, 1], [2, 3]], dtype=torch.int32),
        context_lens=torch.tensor([0, 3]),
        accepted_slots=torch.tensor([[0, 2, 3], [0, 1, -1]]),
        accept_len=torch.tensor([3, 2], dtype=torch.int32),
    )
    args.update(change)
    return list(args.values())


COMPACT_ERRORS = [
    (dict(caches=[torch.randn(6, 4, 2, 8), torch.randn(6, 2, 2, 8)]), r"caches\[1\] has block size"),
    (dict(caches=[torch.randn(6, 4, 8)]), r"caches\[0\] must have 4 dimensions"),
    (dict(block_table=torch.tensor([[0, 1], [2, 3]])), "block_table must be Int"),
    (dict(block_table=torch.tensor([[0, 1]], dtype=torch.int32)), r"block_table.size\(0\)"),
    (dict(block_table=torch.tensor([[0, 1], [2, 9]], dtype=torch.int32)),
     r"block_table\[1, 1\] = 9 \(position 4, the destination of accepted_slots\[1, 1\]\)"),
    (dict(block_table=torch.tensor([[0, -1], [2, 3]], dtype=torch.int32),
          accepted_slots=torch.tensor([[0, 2, 5], [0, 1, -1]])),
     r"block_table\[0, 1\] = -1 \(position 5, the source of accepted_slots\[0, 2\]\)"),
    (dict(accepted_slots=torch.tensor([[0, 2, 8], [0, 1, -1]])),
     r"position 8 \(context_lens\[0\] \+ 8, the source of accepted_slots\[0, 2\]\) is past"),
    (dict(accepted_slots=torch.tensor([[0, -2, 3], [0, 1, -1]])), r"accepted_slots\[0, 1\] = -2 must be"),
    (dict(accept_len=torch.tensor([4, 2], dtype=torch.int32)), r"accept_len\[0\] = 4"),
    (dict(accept_len=torch.tensor([3, 2])), "accept_len must be Int"),
    (dict(context_lens=torch.tensor([-1, 3])), r"context_lens\[0\] = -1"),
    (dict(context_lens=torch.tensor([6, 3])),
     r"position 8 \(context_lens\[0\] \+ 2, the source of accepted_slots\[0, 1\]\) is past"),
]


@pytest.mark.parametrize("change,message", COMPACT_ERRORS)
def test_paged_compact_kv_errors(change, message):
    args = compact_args(**change)
    before = [c.clone() for c in args[0]]
    with pytest.raises(RuntimeError, match=f"paged_compact_kv: .*{message}"):
        ddtree.paged_compact_kv(*args)
    assert all(torch.equal(c, b) for c, b in zip(args[0], before)), "nothing is written before the checks pass"


# --------------------------------------------------------------------------------------------------
# CUDA: values that need the data are clamped or skipped (no sync), never read or written out of bounds


@gpu
@pytest.mark.gpu
def test_paged_tree_attention_clamps_invalid_values():
    """Contexts, node counts and block ids out of range are clamped on CUDA: finite output, in bounds; with
    only the block ids bad, the result is the attention over the clamped ids."""
    gen = torch.Generator().manual_seed(21)
    B, Hq, Hkv, T, d, block_size, max_blocks = 3, 4, 2, 9, 64, 16, 4
    table, num_blocks = make_table(B, max_blocks, 1, gen)
    kp, vp = (garbage_paged(num_blocks, block_size, Hkv, d, torch.float16, gen) / 100 for _ in range(2))
    q = torch.randn(B, Hq, T, d, generator=gen).half()
    mask = torch.full((B, T, 1), -1, dtype=torch.int32)
    bad_table = table.clone()
    bad_table[0, 0], bad_table[1, 1], bad_table[2, 0] = -7, num_blocks, 2**31 - 1
    args = [t.cuda() for t in (q, kp, vp, bad_table)]
    wild = ddtree.paged_tree_attention(*args, torch.tensor([-5, 10_000, 31]).cuda(),
                                       mask.cuda(), torch.tensor([-3, 100, 8], dtype=torch.int32).cuda(), 0.125)
    torch.cuda.synchronize()
    assert torch.isfinite(wild).all()
    ctx, nn = torch.tensor([3, 20, 30]), torch.full((B,), T - 1, dtype=torch.int32)
    got = ddtree.paged_tree_attention(*args, ctx.cuda(), mask.cuda(), nn.cuda(), 0.125).cpu()
    want = ddtree.paged_tree_attention(q, kp, vp, bad_table.clamp(0, num_blocks - 1), ctx, mask, nn, 0.125)
    assert ((got.double() - want.double()).abs() <= 2 * tolerance(torch.float16) * vp.abs().max()).all()


@gpu
@pytest.mark.gpu
def test_paged_compact_kv_clamps_invalid_values():
    """On CUDA, moves whose context, slot or block id is out of range are skipped; the valid ones happen."""
    gen = torch.Generator().manual_seed(22)
    block_size, max_blocks = 4, 3
    table, num_blocks = make_table(4, max_blocks, 0, gen)
    cache = garbage_paged(num_blocks, block_size, 2, 8, torch.float32, gen)
    table[3, 1] = -1  # request 3: position 4 has no block
    ctx = torch.tensor([-1, 12, 0, 2])  # request 0 and 1: outside [0, 12), skipped
    slots = torch.tensor([[1, 2], [1, 0], [3, 2**40], [0, 3]])
    alen = torch.tensor([2, 2, 5, 2], dtype=torch.int32)  # request 2: clamped to 2, its second slot skipped
    got = cache.cuda()
    ddtree.paged_compact_kv([got], table.cuda(), ctx.cuda(), slots.cuda(), alen.cuda())
    want = cache.clone()
    row = lambda b, p: (int(table[b, p // block_size]), p % block_size)  # noqa: E731
    want[row(2, 0)] = cache[row(2, 3)]  # request 2: position 0 <- 3; position 1 <- 2^40 skipped
    # request 3: position 2 <- 2 is a no-op, 3 <- 5 has no block (table[3, 1] = -1): skipped
    torch.cuda.synchronize()
    assert torch.equal(got.cpu(), want)
